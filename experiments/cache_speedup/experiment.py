"""cache-speedup: greedy generation with no cache vs a concat cache vs a dense cache.

A Llama/Qwen2-shaped decoder with random weights (shape from the parameters) generates
``new_tokens`` greedy tokens from random prompts of each length in ``prompt_lengths``,
once per cache kind (``kvjax.engine.generate.generate``):

* ``none``: every step runs the whole sequence through the model again;
* ``concat``: a cache that grows by concatenation (one recompile per new length);
* ``dense``: a preallocated cache updated in place inside one device loop.

Timings. The first call of each (kind, prompt length) runs right after
``jax.clear_caches()``, so it includes tracing and compiling: that is the *cold* time
(for concat, which compiles one step per cache length, it is its real cost). Then
``repeats`` more calls are timed and the fastest is the *warm* time: execution only.
Every call is wrapped in ``jax.block_until_ready`` (generate also copies its ids to the
host), so asynchronous dispatch on an accelerator cannot hide work.

Theory. FLOPs follow ``kvjax.analysis.roofline`` (matmuls ``2 * params`` per token plus
``QK^T`` and ``PV``, ``4 * heads * head_dim`` per (query, key) pair and layer; the LM
head on one position per step). Without a cache step ``t`` re-runs all ``P + t`` tokens,
attention ``O((P + t)^2)``; with one it runs one token against ``P + t`` keys. The
*ideal* ratio compares those sums (causal pairs only, no padding). The *executed* ratio
counts what the code actually computes: generate pads prompts to a multiple of 16 and
the step count to a multiple of 32, the uncached loop runs at the fixed width
``prompt + steps`` every step, attention is computed over every (masked) slot, and the
dense cache attends over its whole capacity (prompt + steps rounded up to 64) each step.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax.analysis import layers
from kvjax.analysis.roofline import decode_cost, prefill_cost
from kvjax.analysis.spec import ArchSpec
from kvjax.config import ModelConfig
from kvjax.engine.generate import generate
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from kvjax.runner import write_csv

KINDS = ("none", "concat", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Padding of kvjax.engine.generate.generate, mirrored for the executed-FLOP count.
WIDTH_MULTIPLE = 16  # prompts are right-padded to a multiple of this
STEPS_MULTIPLE = 32  # the decode loop is compiled for a multiple of this many steps
DENSE_MULTIPLE = 64  # the dense cache holds (padded prompt + steps) rounded up to this


@dataclasses.dataclass(frozen=True)
class Params:
    """Workload, model shape and timing of the cache-speedup experiment."""

    prompt_lengths: tuple[int, ...] = (64, 128, 256, 512)  # prompt tokens per sequence
    new_tokens: int = 64  # greedy tokens generated per sequence
    batch: int = 1  # sequences per generate call
    kinds: tuple[str, ...] = KINDS  # cache kinds to time; must include "none" (baseline)
    dtype: str = "float32"  # parameter and compute dtype: float32 or bfloat16
    repeats: int = 2  # warm calls timed after the cold one; the fastest is reported
    family: str = "llama"  # "llama" or "qwen2" (q/k/v bias, as in Qwen2)
    num_layers: int = 4  # decoder blocks
    hidden_size: int = 256  # residual stream width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    head_dim: int = 32  # width of one head
    intermediate_size: int = 768  # SwiGLU hidden width
    vocab_size: int = 1024  # vocabulary (embedding rows and LM head columns)
    qkv_bias: bool = False  # bias on q/k/v projections
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    init_scale: float = 0.05  # std of the normal random weights (norm weights are 1)
    seed: int = 0  # seed of the weights and the prompts

    def __post_init__(self) -> None:
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError("prompt_lengths must be positive")
        if self.new_tokens < 1 or self.batch < 1 or self.repeats < 1:
            raise ValueError("new_tokens, batch and repeats must be positive")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or "none" not in self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct values of {KINDS} including 'none', "
                             f"got {self.kinds}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"family must be 'llama' or 'qwen2', got {self.family!r}")
        if not self.init_scale > 0:
            raise ValueError("init_scale must be positive")
        model_config(self)  # ConfigError (a ValueError) on a bad shape


def model_config(p: Params) -> ModelConfig:
    """The decoder shape the parameters describe."""
    return ModelConfig(
        family=p.family,  # type: ignore[arg-type]
        vocab_size=p.vocab_size, hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size, num_layers=p.num_layers,
        num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
        max_position_embeddings=max(p.prompt_lengths) + p.new_tokens,
        qkv_bias=p.qkv_bias, tie_word_embeddings=p.tie_word_embeddings)


def make_prompts(p: Params) -> dict[int, list[list[int]]]:
    """``batch`` uniformly random prompts per prompt length, drawn in that order."""
    rng = np.random.default_rng(p.seed)
    return {n: rng.integers(0, p.vocab_size, (p.batch, n)).tolist() for n in p.prompt_lengths}


def _ceil(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def ideal_flops(spec: ArchSpec, prompt_len: int, new_tokens: int, batch: int,
                cached: bool) -> float:
    """FLOPs of generating ``new_tokens`` after a ``prompt_len`` prompt, no padding.

    Uncached: step ``t`` (0..N-1) prefills ``P + t`` tokens. Cached: one prefill of ``P``
    tokens, then N-1 decode steps at contexts ``P + 1 .. P + N - 1``.
    """
    if not cached:
        return sum(prefill_cost(spec, prompt_len + t, batch).flops for t in range(new_tokens))
    return prefill_cost(spec, prompt_len, batch).flops + sum(
        decode_cost(spec, prompt_len + t, batch).flops for t in range(1, new_tokens))


def executed_flops(spec: ArchSpec, kind: str, prompt_len: int, new_tokens: int,
                   batch: int) -> float:
    """FLOPs generate() computes for ``kind``, padding and masked attention slots included."""
    per_token = 2 * sum(m.active_params for i in range(spec.num_layers)
                        for m in layers.layer_matmuls(spec, i))
    head = 2 * layers.head_matmul(spec).params
    pair = spec.num_layers * 4 * spec.num_heads * spec.head_dim

    def step(tokens: int, keys: int) -> int:  # one forward over `tokens` queries, `keys` keys
        return tokens * per_token + head + pair * tokens * keys

    width = _ceil(prompt_len, WIDTH_MULTIPLE)
    steps = _ceil(new_tokens, STEPS_MULTIPLE)
    if kind == "none":
        total = new_tokens * step(width + steps, width + steps)
    elif kind == "dense":
        slots = _ceil(width + steps, DENSE_MULTIPLE)
        total = step(width, slots) + (new_tokens - 1) * step(1, slots)
    elif kind == "concat":
        total = step(width, width) + sum(step(1, width + t) for t in range(1, new_tokens))
    else:
        raise ValueError(f"no executed-FLOP model for kind {kind!r}")
    return float(batch * total)


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    """Leading tokens two generations share (bf16 roundings may make greedy paths part)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Time every (kind, prompt length); write ``cache_speedup.csv`` and the PNG."""
    cfg = model_config(p)
    spec = ArchSpec.from_model_config(cfg, name="cache-speedup model")
    model = Decoder(cfg, DTYPES[p.dtype])
    weights = jax.block_until_ready(random_params(cfg, DTYPES[p.dtype], p.seed, p.init_scale))
    prompts = make_prompts(p)

    rows: list[dict[str, Any]] = []
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    work = [(n, k) for n in p.prompt_lengths for k in p.kinds]
    for n, kind in tqdm(work, desc="generate", unit="run"):
        def call(n: int = n, kind: str = kind) -> Any:
            return generate(model, weights, prompts[n], max_new_tokens=p.new_tokens,
                            cache=kind)  # type: ignore[arg-type]

        jax.clear_caches()  # the cold call compiles everything it needs
        with warnings.catch_warnings():
            # concat donates a cache whose shape then changes, which XLA warns about
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            cold, out = _timed(call)
            warm = min(_timed(call)[0] for _ in range(p.repeats))
        tokens[(kind, n)] = out.tokens
        rows.append({"kind": kind, "prompt_len": n, "new_tokens": p.new_tokens,
                     "batch": p.batch, "cold_s": cold, "warm_s": warm,
                     "tokens_per_s": p.batch * p.new_tokens / warm})

    for r in rows:
        n, kind = r["prompt_len"], r["kind"]
        base = next(b for b in rows if b["prompt_len"] == n and b["kind"] == "none")
        cached = kind != "none"
        r["speedup_vs_none"] = base["warm_s"] / r["warm_s"]
        r["cold_speedup_vs_none"] = base["cold_s"] / r["cold_s"]
        r["ideal_gflops"] = ideal_flops(spec, n, p.new_tokens, p.batch, cached) / 1e9
        r["ideal_flop_ratio"] = (ideal_flops(spec, n, p.new_tokens, p.batch, False)
                                 / ideal_flops(spec, n, p.new_tokens, p.batch, cached))
        r["executed_gflops"] = executed_flops(spec, kind, n, p.new_tokens, p.batch) / 1e9
        r["executed_flop_ratio"] = (executed_flops(spec, "none", n, p.new_tokens, p.batch)
                                    / executed_flops(spec, kind, n, p.new_tokens, p.batch))
        r["achieved_gflops_per_s"] = r["executed_gflops"] / r["warm_s"]
        r["tokens_match_none"] = tokens[(kind, n)] == tokens[("none", n)]
        r["agreeing_prefix_min"] = min(_agreeing_prefix(a, b) for a, b in zip(
            tokens[(kind, n)], tokens[("none", n)], strict=True))
        r["generated_tokens"] = sum(len(t) for t in tokens[(kind, n)])

    write_csv(out_dir / "cache_speedup.csv", rows)
    _plot(rows, p, out_dir / "cache_speedup.png")
    return {
        "tokens_identical": all(r["tokens_match_none"] for r in rows),
        "model": dataclasses.asdict(cfg),
        "param_count": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights)),
        "device": jax.devices()[0].device_kind,
        "rows": rows,
        # the no-cache ids per prompt length (the other kinds' match flags are in rows)
        "tokens": {str(n): tokens[("none", n)] for n in p.prompt_lengths},
    }


def _plot(rows: list[dict[str, Any]], p: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:red", "concat": "tab:orange", "dense": "tab:blue"}
    lengths = list(p.prompt_lengths)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in p.kinds:
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["prompt_len"])
        xs = [r["prompt_len"] for r in mine]
        a.plot(xs, [r["warm_s"] for r in mine], "o-", color=colors[kind], label=f"{kind} warm")
        a.plot(xs, [r["cold_s"] for r in mine], "x--", color=colors[kind], alpha=0.6,
               label=f"{kind} cold")
        if kind == "none":
            continue
        b.plot(xs, [r["speedup_vs_none"] for r in mine], "o-", color=colors[kind],
               label=f"{kind}: measured")
        b.plot(xs, [r["executed_flop_ratio"] for r in mine], "s:", color=colors[kind],
               alpha=0.7, label=f"{kind}: FLOP ratio as executed")
    ideal = sorted({(r["prompt_len"], r["ideal_flop_ratio"]) for r in rows if r["kind"] != "none"})
    b.plot([x for x, _ in ideal], [y for _, y in ideal], "k-", lw=2, alpha=0.5,
           label="ideal FLOP ratio (no padding)")
    b.axhline(1.0, color="grey", lw=0.8)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    low, high = a.get_ylim()
    a.set_ylim(low, high * 30)  # headroom for the legend
    a.set_ylabel(f"seconds to generate {p.new_tokens} tokens (cold: + compile)")
    a.set_title(f"{p.num_layers}L h{p.hidden_size} {p.num_heads}/{p.num_kv_heads} heads, "
                f"{p.dtype}, batch {p.batch}, {jax.devices()[0].platform}", fontsize=10)
    a.legend(fontsize=7, ncol=3, loc="upper left")
    b.set_ylabel("speedup over no cache (warm)")
    b.set_title("measured speedup vs predicted FLOP ratio", fontsize=10)
    b.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
