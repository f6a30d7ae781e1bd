"""tiered-cache: hit rate and TTFT with a small device pool (L1) over host (L2) and disk (L3).

A decoder of a real architecture with random weights generates greedily through
``kvjax.engine.prefix_generate.PrefixCachedGenerator``. The workloads are the
prefix-sharing experiment's (``experiments.prefix_sharing.experiment.workload_calls``),
sized so their working set is several times L1:

* ``few-shot`` (shared documents): ``num_tasks`` templates of ``shots`` examples,
  requests cycling through them, each template + a unique query;
* ``multi-turn``: ``num_conversations`` chats sharing a system prompt, one call per
  turn carrying every chat's next message.

Setups (``SETUPS``), each on a fresh generator:

* ``l1-unbounded``: a pool holding the whole workload (the reference outputs);
* ``l1-only``: ``l1_blocks`` pages, evicted blocks dropped (the plain prefix cache);
* ``l1+l2``: the same pool over ``l2_blocks`` host slots;
* ``l1+l2+l3``: + a disk store in a fresh directory, no prefetch (disk reads at lookup);
* ``l1+l2+l3+prefetch``: + background disk reads started ``prefetch_depth`` requests
  ahead, with ``prefetch_policy``;
* ``l3-restart``: as the previous, but the disk directory was filled (``persist``) by an
  earlier generator that ran the same workload: a restarted process.

The L1 pool attends through ``attention`` ("xla" by default; "auto" = the Triton/Pallas
kernels on a GPU). Each setup runs ``1 + repeats`` times (a warm-up that compiles, then measured runs);
TTFT is the generator's (call start -> first-token logits on device), median over
runs per request. Every output is compared with ``l1-unbounded``'s. The tiers' copy
bandwidths (device -> host on eviction, host -> device on promotion, disk) come from
the generator's stats; a plain ``jax.device_put`` / ``jax.device_get`` of
``copy_blocks`` blocks, timed in the same run, is the yardstick (pageable and, where
the device has one, through pinned host memory; ``host_staging`` picks the tiers' path).

Each finished (workload, setup) is saved in ``out_dir/finished``
(:class:`kvjax.resume.FinishedParts`, with its outputs) and reused by a later run with
the same parameters, so a run cut off by a time limit resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.prefix_sharing import experiment as sharing
from kvjax.engine.prefix_generate import PrefixCachedGenerator, PrefixGenerationStats
from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.disk_store import DEFAULT_BACKEND
from kvjax.memory.host_pool import STAGING
from kvjax.memory.tiered_requests import PREFETCH_POLICIES, TierConfig
from kvjax.models.llama import Decoder
from kvjax.resume import FinishedParts
from kvjax.runner import write_csv

WORKLOADS = ("few-shot", "multi-turn")
SETUPS = ("l1-unbounded", "l1-only", "l1+l2", "l1+l2+l3", "l1+l2+l3+prefetch", "l3-restart")


@dataclasses.dataclass(frozen=True)
class Params:
    """Model, tier sizes and workload shape of the tiered-cache experiment."""

    model: str = "qwen2.5-0.5b"  # preset naming the architecture (random weights)
    num_layers: int = 0  # override the preset's depth (0 = the preset's)
    vocab_size: int = 0  # override the vocabulary (0 = the preset's)
    dtype: str = "bfloat16"  # weights and KV: float32 or bfloat16
    block_size: int = 16  # tokens per KV block (page)
    l1_blocks: int = 256  # device pool (L1) of the bounded setups, in blocks
    l2_blocks: int = 512  # host slots (L2), in blocks
    host_staging: str = "pageable"  # L1 <-> L2 copies: one of host_pool.STAGING
    l3_backend: str = DEFAULT_BACKEND  # disk store file I/O: one of blob_store.BACKENDS
    prefetch_policy: str = "wait_complete"  # of the prefetch setups (not "off")
    prefetch_depth: int = 4  # queued requests whose disk blocks are read ahead
    workloads: tuple[str, ...] = WORKLOADS
    setups: tuple[str, ...] = SETUPS
    repeats: int = 2  # measured runs per setup (after one warm-up); median TTFT
    copy_blocks: int = 64  # blocks moved by the plain host <-> device copy yardstick
    max_new_tokens: int = 16  # greedy tokens per request (no stop tokens)
    requests_per_call: int = 4  # few-shot requests per generate call
    num_requests: int = 24  # few-shot requests
    num_tasks: int = 8  # few-shot documents (templates), requests cycle through them
    shots: int = 4  # examples per document
    shot_len: int = 128  # tokens per example
    query_len: int = 32  # unique part of a few-shot request
    num_conversations: int = 8  # multi-turn chats
    num_turns: int = 4  # turns per chat
    system_len: int = 256  # shared system prompt of the chats
    user_len: int = 64  # tokens per user message
    seed: int = 0  # weights and token ids
    attention: str = "xla"  # the L1 pool's paged attention backend ("auto": kernels on GPU)

    def __post_init__(self) -> None:
        if self.dtype not in sharing.DTYPES:
            raise ValueError(f"dtype must be one of {sorted(sharing.DTYPES)}, got {self.dtype!r}")
        for name, known, given in (("workloads", WORKLOADS, self.workloads),
                                   ("setups", SETUPS, self.setups)):
            bad = sorted(set(given) - set(known))
            if bad or not given:
                raise ValueError(f"unknown {name} {bad}; known: {list(known)}")
        if "l1-unbounded" not in self.setups:
            raise ValueError("setups must include l1-unbounded (the reference outputs)")
        if self.host_staging not in STAGING:
            raise ValueError(f"host_staging must be one of {STAGING}, got "
                             f"{self.host_staging!r}")
        if self.l3_backend not in BACKENDS:
            raise ValueError(f"l3_backend must be one of {BACKENDS}, got {self.l3_backend!r}")
        if self.prefetch_policy not in PREFETCH_POLICIES[1:]:
            raise ValueError(f"prefetch_policy must be one of {PREFETCH_POLICIES[1:]}")
        if min(self.repeats, self.copy_blocks, self.l2_blocks, self.prefetch_depth) < 1:
            raise ValueError("repeats, copy_blocks, l2_blocks and prefetch_depth must be >= 1")
        self.sharing()  # validates the workload shape and that L1 holds any one request

    def sharing(self) -> sharing.Params:
        """The prefix-sharing parameters that build this experiment's workloads."""
        return sharing.Params(
            model=self.model, block_size=self.block_size, pool_blocks=(self.l1_blocks,),
            workloads=self.workloads, max_new_tokens=self.max_new_tokens,
            requests_per_call=self.requests_per_call, num_requests=self.num_requests,
            system_len=self.system_len, num_tasks=self.num_tasks, shots=self.shots,
            shot_len=self.shot_len, query_len=self.query_len,
            num_conversations=self.num_conversations, num_turns=self.num_turns,
            user_len=self.user_len, seed=self.seed, attention=self.attention)


def workload_blocks(p: Params, workload: str) -> int:
    """Blocks to hold every request of the workload at once (an upper bound)."""
    s = p.sharing()
    count = p.num_conversations * p.num_turns if workload == "multi-turn" else p.num_requests
    return count * -(-sharing.request_tokens(s, workload) // p.block_size)


def plain_copy_gbps(nbytes: int, dtype: Any, reps: int = 5) -> dict[str, float]:
    """Median GB/s of plain host <-> device copies of a fresh random array of ``nbytes``
    bytes: ``jax.device_put`` / ``jax.device_get`` of NumPy memory (``host_to_device``,
    ``device_to_host``) and, where the device has a ``pinned_host`` memory, the same
    through a pinned buffer (``pinned_*``: NumPy -> pinned -> device and back, the path
    of ``host_staging: pinned``)."""
    host = np.random.default_rng(0).standard_normal(nbytes // jnp.dtype(dtype).itemsize)
    host = host.astype(jnp.dtype(dtype))
    device = jax.devices()[0]
    mem = {m.kind for m in device.addressable_memories()}
    on = {kind: jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
          for kind in ("device", "pinned_host") if kind in mem}

    Copy = tuple[Callable[[], Any], Callable[[Any], Any]]  # (host -> device, back)
    paths: dict[str, Copy] = {"": (lambda: jax.device_put(host), jax.device_get)}
    if "pinned_host" in on:
        paths["pinned_"] = (
            lambda: jax.device_put(jax.device_put(host, on["pinned_host"]), on["device"]),
            lambda dev: np.asarray(jax.device_put(dev, on["pinned_host"])))
    out: dict[str, float] = {}
    for prefix, (put, get) in paths.items():
        to_dev, to_host = [], []
        for _ in range(reps + 1):  # the first round warms up
            t0 = time.perf_counter()
            dev = jax.block_until_ready(put())
            t1 = time.perf_counter()
            back = get(dev)
            t2 = time.perf_counter()
            assert back.nbytes == host.nbytes
            to_dev.append(t1 - t0)
            to_host.append(t2 - t1)
        out[prefix + "host_to_device"] = host.nbytes / statistics.median(to_dev[1:]) / 1e9
        out[prefix + "device_to_host"] = host.nbytes / statistics.median(to_host[1:]) / 1e9
    return out


class _Runner:
    """Builds each setup's generator and drives a workload through it."""

    def __init__(self, p: Params, model: Decoder, params: Any, device_blocks: int,
                 tmp: Path) -> None:
        self.p, self.model, self.params = p, model, params
        self.device_blocks, self.tmp = device_blocks, tmp
        self._dirs = 0

    def _fresh_dir(self) -> str:
        self._dirs += 1
        return str(self.tmp / f"l3-{self._dirs}")

    def generator(self, setup: str, disk_dir: str | None = None) -> PrefixCachedGenerator:
        p = self.p
        tiers = None
        if setup not in ("l1-unbounded", "l1-only"):
            disk = None if setup == "l1+l2" else disk_dir or self._fresh_dir()
            prefetch = "off" if setup in ("l1+l2", "l1+l2+l3") else p.prefetch_policy
            tiers = TierConfig(host_blocks=p.l2_blocks, host_staging=p.host_staging,
                               disk_dir=disk, disk_backend=p.l3_backend,
                               namespace=f"random-{p.model}-seed{p.seed}", prefetch=prefetch,
                               prefetch_depth=p.prefetch_depth)
        pool = self.device_blocks if setup == "l1-unbounded" else p.l1_blocks
        return PrefixCachedGenerator(self.model, self.params, num_blocks=pool,
                                     block_size=p.block_size, device_blocks=self.device_blocks,
                                     tiers=tiers, attention=p.attention)

    def drive(self, gen: PrefixCachedGenerator, workload: str
              ) -> tuple[list[list[int]], list[PrefixGenerationStats]]:
        n = self.p.max_new_tokens

        def call(prompts: list[list[int]]) -> tuple[list[list[int]], PrefixGenerationStats]:
            out, st = gen.generate(prompts, max_new_tokens=n)
            return out.tokens, st

        _, outs, stats = sharing.drive(self.p.sharing(), workload, self.model.cfg.vocab_size,
                                       call)
        return outs, stats

    def run(self, setup: str, workload: str
            ) -> tuple[list[list[int]], list[PrefixGenerationStats], dict[str, Any] | None]:
        """One run on a fresh generator: outputs, per-call stats, tier stats."""
        disk = None
        if setup == "l3-restart":  # an earlier process filled the disk
            disk = self._fresh_dir()
            first = self.generator("l1+l2+l3+prefetch", disk)
            self.drive(first, workload)
            first.persist()
        gen = self.generator(setup, disk)
        outs, stats = self.drive(gen, workload)
        return outs, stats, gen.tier_stats() if gen.tiers is not None else None


def _row(workload: str, setup: str, runs: list[list[PrefixGenerationStats]],
         tiers: dict[str, Any] | None, identical: bool) -> dict[str, Any]:
    """One CSV row: hits per tier, TTFT (medians over runs), bytes moved, bandwidths."""
    reqs = [r for st in runs[0] for r in st.requests]
    ttft = np.median([[r.ttft_s for st in run for r in st.requests] for run in runs], axis=0)
    prompt = sum(r.prompt_tokens for r in reqs)
    hit = sum(r.hit_tokens for r in reqs)
    l2 = sum(r.l2_hit_tokens for r in reqs)
    l3 = sum(r.l3_hit_tokens for r in reqs)
    row: dict[str, Any] = {
        "workload": workload, "setup": setup, "requests": len(reqs), "prompt_tokens": prompt,
        "hit_rate": hit / prompt, "l1_hit_rate": (hit - l2 - l3) / prompt,
        "l2_hit_rate": l2 / prompt, "l3_hit_rate": l3 / prompt,
        "prefill_tokens_computed": sum(r.prefill_tokens_computed for r in reqs),
        "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.median(ttft)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "total_s": float(np.median([sum(st.total_s for st in run) for run in runs])),
        "tokens_identical": identical}
    t = tiers or {}
    blocks, nbytes = t.get("blocks", {}), t.get("bytes", {})
    seconds, gbps = t.get("seconds", {}), t.get("gbps", {})
    row.update({
        "evicted_blocks": sum(st.evicted_blocks for st in runs[0]),
        "blocks_l1_to_l2": blocks.get("l1_to_l2", 0), "blocks_to_l3": blocks.get("to_l3", 0),
        "blocks_dropped": blocks.get("dropped", 0), "blocks_l2_to_l1": blocks.get("l2_to_l1", 0),
        "blocks_l3_to_l1": blocks.get("l3_to_l1", 0),
        "blocks_prefetched": blocks.get("l3_to_l2_prefetched", 0),
        "mb_device_to_host": nbytes.get("device_to_host", 0) / 1e6,
        "mb_host_to_device": nbytes.get("host_to_device", 0) / 1e6,
        "mb_to_disk": nbytes.get("to_disk", 0) / 1e6,
        "mb_from_disk": nbytes.get("from_disk", 0) / 1e6,
        "gbps_device_to_host": gbps.get("device_to_host", 0.0),
        "gbps_host_to_device": gbps.get("host_to_device", 0.0),
        "gbps_disk_write": gbps.get("disk_write", 0.0),
        "gbps_disk_read": gbps.get("disk_read", 0.0),
        "promote_s": seconds.get("promote", 0.0),
        "prefetch_wait_s": seconds.get("prefetch_wait", 0.0),
        "prefetch_hidden_s": seconds.get("prefetch_hidden", 0.0)})
    return row


def finished_parts(p: Params, out_dir: Path) -> FinishedParts:
    """Finished (workload, setup) runs in ``out_dir/finished``, keyed by every parameter
    but the workloads and setups run."""
    return FinishedParts.keyed_by(out_dir / "finished", p, ignore=("workloads", "setups"))


def _setting(runner: _Runner, workload: str, setup: str,
             reference: list[list[int]] | None, bar: tqdm) -> dict[str, Any]:
    """Warm-up + ``repeats`` measured runs of one setup -> {"row", "outputs"}; outputs are
    compared with ``reference`` (None: this setup is the reference)."""
    runs: list[list[PrefixGenerationStats]] = []
    identical, tiers, is_reference = True, None, reference is None
    for rep in range(1 + runner.p.repeats):
        bar.set_postfix_str(f"{workload} {setup} {'warm-up' if rep == 0 else rep}")
        outs, stats, tiers = runner.run(setup, workload)
        reference = reference or outs
        identical = identical and outs == reference
        if rep:
            runs.append(stats)
        bar.update()
    row = _row(workload, setup, runs, tiers, identical)
    row["device"] = jax.devices()[0].device_kind
    return {"row": row, "outputs": reference if is_reference else outs}


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Every (workload, setup); write CSV and PNG into ``out_dir``."""
    spec, model, params = sharing.build_model(p.model, p.num_layers, p.vocab_size, p.dtype,
                                              p.seed)
    cfg, dtype = model.cfg, sharing.DTYPES[p.dtype]
    device_blocks = max(workload_blocks(p, w) for w in p.workloads)
    block_bytes = 2 * cfg.num_layers * p.block_size * cfg.num_kv_heads * cfg.head_dim * (
        jnp.dtype(dtype).itemsize)
    plain = plain_copy_gbps(p.copy_blocks * block_bytes, dtype)
    order = ["l1-unbounded"] + [s for s in p.setups if s != "l1-unbounded"]
    finished = finished_parts(p, out_dir)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvjax-l3-") as tmp, tqdm(
            total=len(p.workloads) * len(order) * (1 + p.repeats), desc="tiered-cache",
            unit="run") as bar:
        runner = _Runner(p, model, params, device_blocks, Path(tmp))
        for w in p.workloads:
            reference: list[list[int]] | None = None  # the l1-unbounded outputs
            for setup in order:
                part = f"{w}-{setup}"
                done = finished.load(part)
                if done is None:
                    assert reference is not None or setup == "l1-unbounded"
                    done = _setting(runner, w, setup, reference, bar)
                    finished.save(part, done)
                else:
                    bar.update(1 + p.repeats)
                reference = reference or done["outputs"]
                rows.append(done["row"])
    for row in rows:
        base = next(r for r in rows if (r["workload"], r["setup"]) == (row["workload"],
                                                                        "l1-only"))
        row["ttft_speedup_vs_l1_only"] = base["ttft_mean_s"] / row["ttft_mean_s"]
    write_csv(out_dir / "tiered_cache.csv", rows)
    _plot(rows, p, out_dir / "tiered_cache.png",
          f"tiered prefix cache: {spec.name} shape, {cfg.num_layers} layers, {p.dtype}, "
          f"L1 {p.l1_blocks} / L2 {p.l2_blocks} blocks of {p.block_size} tokens")
    return {"model": spec.name, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
            "dtype": p.dtype, "block_size": p.block_size, "block_bytes": block_bytes,
            "l1_blocks": p.l1_blocks, "l2_blocks": p.l2_blocks, "l3_backend": p.l3_backend,
            "host_staging": p.host_staging,
            "workload_blocks": {w: workload_blocks(p, w) for w in p.workloads},
            "plain_copy_gbps": plain,
            "all_tokens_identical": all(r["tokens_identical"] for r in rows), "rows": rows}


def _plot(rows: list[dict[str, Any]], p: Params, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(p.workloads), figsize=(5.5 * len(p.workloads), 7.5),
                             squeeze=False)
    colors = {"l1": "tab:blue", "l2": "tab:orange", "l3": "tab:green"}
    for col, w in enumerate(p.workloads):
        sel = [r for r in rows if r["workload"] == w]
        x = np.arange(len(sel))
        names = [r["setup"] for r in sel]
        top, bottom = axes[0, col], axes[1, col]
        base = np.zeros(len(sel))
        for tier in ("l1", "l2", "l3"):
            part = np.asarray([100 * r[f"{tier}_hit_rate"] for r in sel])
            top.bar(x, part, bottom=base, color=colors[tier], label=f"{tier.upper()} hits")
            base += part
        top.set_ylabel("% of prompt tokens found cached")
        top.set_ylim(0, 100)
        top.set_title(w)
        bottom.bar(x - 0.2, [1e3 * r["ttft_mean_s"] for r in sel], 0.4, label="mean",
                   color="tab:purple")
        bottom.bar(x + 0.2, [1e3 * r["ttft_p50_s"] for r in sel], 0.4, label="p50",
                   color="tab:gray")
        bottom.set_ylabel("TTFT (ms)")
        for ax in (top, bottom):
            ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
