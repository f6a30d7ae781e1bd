"""Synthetic serving workloads: Poisson arrivals, length distributions, shared prefixes.

A workload is a list of requests, each with an arrival time (seconds from the start),
a prompt of random token ids and a number of new tokens. Everything is drawn from one
NumPy generator seeded by ``WorkloadConfig.seed``, so a workload is reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DISTS = ("fixed", "uniform", "lognormal")
# The keys each distribution reads (besides ``dist``); any other key is an error.
DIST_KEYS = {"fixed": ("value",), "uniform": ("min", "max"),
             "lognormal": ("median", "sigma", "min", "max")}


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts.

    ``fixed``: always ``value``. ``uniform``: integers in ``[min, max]``.
    ``lognormal``: ``round(median * exp(sigma * N(0, 1)))`` clipped to ``[min, max]``.
    """

    dist: str = "fixed"
    value: int = 128
    min: int = 1
    max: int = 128
    median: float = 64.0
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.dist not in DISTS:
            raise ValueError(f"dist must be one of {DISTS}, got {self.dist!r}")
        if self.dist == "fixed" and self.value < 0:
            raise ValueError(f"value must be >= 0, got {self.value}")
        if self.dist != "fixed" and not 0 <= self.min <= self.max:
            raise ValueError(f"need 0 <= min <= max, got min={self.min}, max={self.max}")
        if self.dist == "lognormal" and not (self.median > 0 and self.sigma >= 0):
            raise ValueError(f"need median > 0 and sigma >= 0, got {self.median}, {self.sigma}")

    @property
    def low(self) -> int:
        """The smallest value it can draw."""
        return self.value if self.dist == "fixed" else self.min

    @property
    def high(self) -> int:
        """The largest value it can draw."""
        return self.value if self.dist == "fixed" else self.max

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` draws, int64 [n]."""
        if self.dist == "fixed":
            return np.full((n,), self.value, np.int64)
        if self.dist == "uniform":
            return rng.integers(self.min, self.max + 1, n)
        draws = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n)))
        return np.clip(draws, self.min, self.max).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Requests of a serving benchmark.

    ``prompt_len`` is each request's own prompt; a request that shares the prefix
    (probability ``shared_prefix_fraction``) has the one ``shared_prefix_len``-token
    prefix prepended. ``arrival_rate`` 0 means every request arrives at once.
    """

    num_requests: int = 32
    arrival_rate: float = 8.0  # requests per second (Poisson process); 0 = all at t = 0
    prompt_len: LengthDist = LengthDist("uniform", min=16, max=128)
    output_len: LengthDist = LengthDist("uniform", min=8, max=32)
    shared_prefix_fraction: float = 0.0
    shared_prefix_len: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.arrival_rate >= 0:
            raise ValueError(f"arrival_rate must be >= 0, got {self.arrival_rate}")
        if not 0 <= self.shared_prefix_fraction <= 1:
            raise ValueError(f"shared_prefix_fraction must be in [0, 1], got "
                             f"{self.shared_prefix_fraction}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")
        if self.shared_prefix_fraction > 0 and self.shared_prefix_len == 0:
            raise ValueError("shared_prefix_fraction > 0 needs shared_prefix_len > 0")
        if self.prompt_len.low < 1 and self.shared_prefix_fraction < 1:
            raise ValueError("prompt_len can draw 0 for a request without the shared prefix")

    @property
    def max_prompt_tokens(self) -> int:
        return self.prompt_len.high + (self.shared_prefix_len
                                       if self.shared_prefix_fraction > 0 else 0)

    @property
    def max_request_tokens(self) -> int:
        """Most tokens (prompt + new) one request can hold."""
        return self.max_prompt_tokens + self.output_len.high


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request of a workload."""

    arrival_s: float  # seconds after the start
    prompt: tuple[int, ...]
    max_new_tokens: int
    shared_prefix: bool  # starts with the workload's shared prefix


def make_workload(cfg: WorkloadConfig, vocab_size: int) -> list[WorkItem]:
    """Draw the workload's requests, in arrival order (token ids uniform in the vocab)."""
    rng = np.random.default_rng([cfg.seed, 7])
    n = cfg.num_requests
    if cfg.arrival_rate > 0:
        gaps = rng.exponential(1.0 / cfg.arrival_rate, n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    else:
        arrivals = np.zeros(n)
    prompt_lens = cfg.prompt_len.sample(rng, n)
    output_lens = cfg.output_len.sample(rng, n)
    shared = rng.random(n) < cfg.shared_prefix_fraction
    prefix = rng.integers(0, vocab_size, cfg.shared_prefix_len).tolist()
    items = []
    for i in range(n):
        own = rng.integers(0, vocab_size, int(prompt_lens[i])).tolist()
        prompt = (prefix if shared[i] else []) + own
        items.append(WorkItem(float(arrivals[i]), tuple(prompt), int(output_lens[i]),
                              bool(shared[i])))
    return items
