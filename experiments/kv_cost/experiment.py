"""kv-cost: measured KV memory and decode-step latency vs context length, against theory.

For each context length T and each cache layout a cache of exactly T slots per
sequence (T - 1 filled, the step writes the last) is allocated for a real model shape
with random weights: the dense cache ``[L, B, T, K, D]``, or a paged pool of exactly
``B * T / block_size`` pages whose block tables are a random permutation (attention
through the backend ``attention`` resolves to: the XLA gather on CPU, a decode kernel
on GPU). Memory is the bytes of the cache's K and V device buffers; theory is
``2 * layers * kv_heads * head_dim * bytes * batch * T`` from the sizing calculator.
Latency is one jitted decode step (cache donated), timed back to back. Theory: decode
is memory-bound, so a step costs (weight bytes + KV bytes) / bandwidth, with the read
bandwidth measured in the same run; each layout's fitted slope (seconds per context
token) should match ``batch * KV bytes per token / bandwidth`` and the intercept the
weights. Steps are queued back to back (the cache donated from one to the next).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax.analysis.bandwidth import copy_bandwidth, read_bandwidth, time_queued
from kvjax.analysis.presets import get_preset
from kvjax.analysis.sizing import kv_bytes, kv_bytes_per_token, storage_dtype, weight_bytes
from kvjax.analysis.spec import ArchSpec
from kvjax.cache import DenseCache, PagedCache
from kvjax.engine.generate import forward_step, resolve_attention
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from kvjax.runner import write_csv

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CACHES = ("dense", "paged")


@dataclasses.dataclass(frozen=True)
class Params:
    """Model shape, batch and the context lengths of the kv-cost experiment."""

    model: str = "qwen2.5-0.5b"  # preset naming the architecture (random weights)
    num_layers: int = 0  # override the preset's depth (0 = the preset's)
    dtype: str = "float32"  # weights and cache dtype: float32 or bfloat16
    batch: int = 4  # sequences decoded together
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)  # cache slots per sequence
    repeats: int = 10  # timed decode steps per context (after warm-up)
    bandwidth_mib: int = 512  # size of the array streamed to measure bandwidth
    caches: tuple[str, ...] = ("dense",)  # layouts measured: dense and/or paged
    block_size: int = 16  # paged layout: tokens per page
    attention: str = "auto"  # paged layout: decode attention backend ("auto" resolves)
    fit_min_context: int = 0  # fit lines only through contexts >= this (memory-bound range)
    seed: int = 0  # weight and cache contents

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.batch < 1 or self.repeats < 1 or not self.contexts or min(self.contexts) < 2:
            raise ValueError("batch, repeats must be >= 1 and contexts >= 2")
        if sum(t >= self.fit_min_context for t in self.contexts) < 2:
            raise ValueError(f"at least two contexts must be >= fit_min_context="
                             f"{self.fit_min_context} to fit a line")
        if not self.caches or any(c not in CACHES for c in self.caches):
            raise ValueError(f"caches must be a non-empty list from {CACHES}, got {self.caches}")
        if "paged" in self.caches and any(t % self.block_size for t in self.contexts):
            raise ValueError(f"with the paged layout every context must be a multiple of "
                             f"block_size={self.block_size}, got {self.contexts}")


def measure_bandwidth(mib: int) -> dict[str, float]:
    """Read and copy (read + write) bandwidth of the device, bytes/s."""
    return {"read_bytes_per_s": read_bandwidth(mib), "copy_bytes_per_s": copy_bandwidth(mib)}


def _random_kv(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype
               ) -> tuple[jax.Array, jax.Array]:
    kk, kv = jax.random.split(key)
    return (jax.random.normal(kk, shape, jnp.float32).astype(dtype),
            jax.random.normal(kv, shape, jnp.float32).astype(dtype))


def make_cache(layout: str, model: Decoder, p: Params, dtype: jnp.dtype, context: int
               ) -> DenseCache | PagedCache:
    """A full cache of ``context`` slots per sequence, ``context - 1`` of them filled.

    dense: k/v ``[L, B, context, K, D]``. paged: k/v pages ``[L, B * context / S, S, K, D]``
    with S = ``block_size`` and every page owned by one sequence, in random order.
    """
    cfg = model.cfg
    key = jax.random.key(p.seed + context)
    lengths = jnp.full((p.batch,), context - 1, jnp.int32)
    if layout == "dense":
        k, v = _random_kv(key, (cfg.num_layers, p.batch, context, cfg.num_kv_heads,
                                cfg.head_dim), dtype)
        return DenseCache(k=k, v=v, lengths=lengths)
    per_seq = context // p.block_size
    num_pages = p.batch * per_seq
    k, v = _random_kv(key, (cfg.num_layers, num_pages, p.block_size, cfg.num_kv_heads,
                            cfg.head_dim), dtype)
    tables = np.random.default_rng(p.seed + context).permutation(num_pages)
    return PagedCache(k_pages=k, v_pages=v,
                      block_tables=jnp.asarray(tables.reshape(p.batch, per_seq), jnp.int32),
                      lengths=lengths,
                      attention=resolve_attention(p.attention, p.block_size, cfg.head_dim))


@partial(jax.jit, static_argnames=("model", "steps"), donate_argnames=("cache",))
def _decode_steps(model: Decoder, params: Any, tokens: jax.Array, positions: jax.Array,
                  cache: DenseCache | PagedCache, *, steps: int
                  ) -> tuple[jax.Array, DenseCache | PagedCache]:
    """``steps`` decode steps in one device loop, each rewriting the same last slot (so
    the context stays fixed); returns the last logits [B, V] and the cache."""
    index = jnp.zeros((tokens.shape[0],), jnp.int32)

    def body(_: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        _, c = carry
        return forward_step(model, params, tokens, positions, c, index)

    first = forward_step(model, params, tokens, positions, cache, index)
    return jax.lax.fori_loop(1, steps, body, first)


def _decode_time(model: Decoder, params: Any, p: Params, dtype: jnp.dtype, layout: str,
                 context: int) -> tuple[float, int]:
    """(median seconds per decode step at ``context`` slots, bytes of the K/V buffers).

    Steps run ``repeats`` at a time in one device loop, as generation runs them, so host
    dispatch is not counted.
    """
    cache = make_cache(layout, model, p, dtype, context)
    bufs = (cache.k, cache.v) if isinstance(cache, DenseCache) else (cache.k_pages,
                                                                      cache.v_pages)
    measured_bytes = int(sum(b.nbytes for b in bufs))
    tokens = jnp.ones((p.batch, 1), jnp.int32)
    positions = jnp.full((p.batch, 1), context - 1, jnp.int32)
    state = {"cache": cache}

    def run_steps() -> jax.Array:
        logits, state["cache"] = _decode_steps(model, params, tokens, positions,
                                               state["cache"], steps=p.repeats)
        return logits

    seconds = time_queued(run_steps, [()], iters=1, reps=5) / p.repeats
    return seconds, measured_bytes


def _fit(rows: list[dict[str, Any]], slope_theory: float, intercept_theory: float
         ) -> dict[str, Any]:
    """Least-squares line through (context, step seconds) against the theory's line."""
    ctx = np.asarray([r["context"] for r in rows], float)
    sec = np.asarray([r["step_seconds"] for r in rows], float)
    slope, intercept = np.polyfit(ctx, sec, 1)
    return {"contexts_fitted": [int(c) for c in ctx],"slope_s_per_token": float(slope), "intercept_s": float(intercept),
            "slope_theory_s_per_token": slope_theory,
            "slope_ratio": float(slope) / slope_theory,
            "intercept_theory_s": intercept_theory,
            "intercept_ratio": float(intercept) / intercept_theory}


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Measure memory and latency per layout and context; write CSV and PNG to ``out_dir``."""
    spec = get_preset(p.model)
    cfg = spec.to_model_config(num_layers=p.num_layers or None)
    spec = ArchSpec.from_model_config(cfg, name=f"{spec.name} ({cfg.num_layers} layers)")
    dtype = _DTYPES[p.dtype]
    size_dtype = storage_dtype(dtype)
    model = Decoder(cfg, dtype=dtype)
    params = random_params(model.cfg, dtype, p.seed)
    bw = measure_bandwidth(p.bandwidth_mib)
    read_bw = bw["read_bytes_per_s"]
    w_bytes = weight_bytes(spec, size_dtype)
    attention = {"dense": "xla",
                 "paged": resolve_attention(p.attention, p.block_size, cfg.head_dim)}
    rows = []
    runs = [(c, t) for c in p.caches for t in p.contexts]
    for layout, t in tqdm(runs, desc="layouts x contexts", unit="run"):
        seconds, mem = _decode_time(model, params, p, dtype, layout, t)
        theory_mem = kv_bytes(spec, size_dtype, p.batch, t)
        rows.append({"cache": layout, "attention": attention[layout], "context": t,
                     "kv_bytes_measured": mem, "kv_bytes_theory": theory_mem,
                     "step_seconds": seconds,
                     "step_seconds_theory": (w_bytes + theory_mem) / read_bw})
    slope_theory = p.batch * kv_bytes_per_token(spec, size_dtype) / read_bw
    write_csv(out_dir / "kv_cost.csv", rows)
    results = {
        "model": spec.name, "dtype": p.dtype, "batch": p.batch,
        "weight_bytes": w_bytes, "kv_bytes_per_token": kv_bytes_per_token(spec, size_dtype),
        "bandwidth": bw, "attention": {c: attention[c] for c in p.caches},
        "memory_matches_theory": all(r["kv_bytes_measured"] == r["kv_bytes_theory"]
                                     for r in rows),
        "fits": {c: _fit([r for r in rows if r["cache"] == c and r["context"] >= p.fit_min_context],
                         slope_theory, w_bytes / read_bw)
                 for c in p.caches},
        "rows": rows,
    }
    _plot(results, out_dir / "kv_cost.png")
    return results


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (layout, fit) in enumerate(res["fits"].items()):
        rows = [r for r in res["rows"] if r["cache"] == layout]
        ctx = np.asarray([r["context"] for r in rows])
        color = f"C{i}"
        if i == 0:
            a.plot(ctx, [r["kv_bytes_theory"] / 2**20 for r in rows], "k-", label="theory")
            b.plot(ctx, [1e3 * r["step_seconds_theory"] for r in rows], "k-",
                   label="(weights + KV) / measured read BW")
        a.plot(ctx, [r["kv_bytes_measured"] / 2**20 for r in rows], "o", color=color,
               label=f"{layout} device buffers")
        b.plot(ctx, [1e3 * r["step_seconds"] for r in rows], "o", color=color,
               label=f"{layout} ({res['attention'][layout]}) measured")
        b.plot(ctx, 1e3 * (fit["intercept_s"] + fit["slope_s_per_token"] * ctx), "--",
               color=color, label=f"{layout} fit: slope {fit['slope_ratio']:.2f}x theory")
    a.set_xlabel("context (tokens per sequence)")
    a.set_ylabel("KV cache (MiB)")
    a.set_title(f"{res['model']}, {res['dtype']}, batch {res['batch']}")
    a.legend()
    b.set_xlabel("context (tokens per sequence)")
    b.set_ylabel("decode step (ms)")
    gbs = res["bandwidth"]["read_bytes_per_s"] / 1e9
    b.set_title(f"read bandwidth measured: {gbs:.0f} GB/s")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
