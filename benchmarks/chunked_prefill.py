"""Chunked prefill over paged history on one GPU: kvjax's Pallas and Triton kernels
against the XLA gather path the model otherwise takes, in one run.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16, page 16,
scrambled block tables. Each row is (batch, history, chunk): every sequence holds
``history`` tokens, the last ``chunk`` of which are the new queries (what a prefix-cache
hit or a chunked prefill computes). Columns: the kernel at a few tile settings, and the
XLA path (``kvjax.cache.paged.paged_attention_reference``: gather pages, masked einsum);
the Triton kernel (``pallas_kernels.triton_chunked_prefill``, launched as
``KVJAX_TRITON_LAUNCH`` says) runs on a GPU.
Prints time per call (queued back to back), attention TFLOP/s (causal: only the keys
each query sees), the kernel's speedup over XLA, and its error against XLA. Writes JSON
to $OUT (or /tmp).

Run: python benchmarks/chunked_prefill.py [--rows 1x4096x512,...]
CPU smoke run (interpreted, tiny): python benchmarks/chunked_prefill.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import time_queued
from kvjax.cache.paged import paged_attention_reference
from pallas_kernels.chunked_prefill import paged_prefill_attention
from pallas_kernels.triton_chunked_prefill import triton_paged_prefill_attention
from pallas_kernels.triton_paged_decode import triton_unavailable_reason

SETTINGS = ({"block_q": 16, "pages_per_block": 4}, {"block_q": 32, "pages_per_block": 4},
            {"block_q": 64, "pages_per_block": 4}, {"block_q": 64, "pages_per_block": 8})
TRITON_SETTINGS: tuple[dict[str, int | bool], ...] = (
    {},  # the default: 64-row query tiles, 4 warps, 64-token steps, 2 stages, diagonal split
    {"block_q": 32, "num_warps": 8},  # 128-row tiles
    {"num_stages": 3},
    {"block_tokens": 16, "num_stages": 4, "split_diagonal": False})  # default until 12-07


def make_row(batch: int, history: int, chunk: int, heads: int, kv_heads: int, head_dim: int,
             page: int, dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    """q [B, chunk, H, D], pages [P, S, K, D] x2, tables [B, M], q_lens [B], lengths [B]."""
    rng = np.random.default_rng(seed)
    per_seq = -(-history // page)
    num_pages = batch * per_seq
    tables = rng.permutation(num_pages).reshape(batch, per_seq)
    q = rng.standard_normal((batch, chunk, heads, head_dim))
    k = rng.standard_normal((num_pages, page, kv_heads, head_dim))
    v = rng.standard_normal((num_pages, page, kv_heads, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(tables, jnp.int32), jnp.full((batch,), chunk, jnp.int32),
            jnp.full((batch,), history, jnp.int32))


def causal_flops(batch: int, history: int, chunk: int, heads: int, head_dim: int) -> float:
    """QK^T and PV multiply-adds over the keys each new token sees (2 FLOPs each)."""
    keys = sum(history - chunk + i + 1 for i in range(chunk))
    return 4.0 * batch * heads * head_dim * keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1x4096x512,4x4096x512,1x4096x2048,8x4096x128")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    ap.add_argument("--triton", default=None,
                    help='Triton settings as a JSON list, e.g. \'[{}, {"block_q": 8}]\'')
    ap.add_argument("--no-pallas", dest="pallas", action="store_false",
                    help="skip the Pallas kernel's columns")
    args = ap.parse_args()
    triton_settings = TRITON_SETTINGS if args.triton is None else tuple(json.loads(args.triton))
    interpret = args.smoke
    heads, kv_heads, head_dim, page = (4, 2, 64, 16) if args.smoke else (32, 8, 128, 16)
    rows = "2x64x24" if args.smoke else args.rows
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    iters, reps = (1, 1) if args.smoke else (10, 5)
    print(f"{jax.devices()[0].device_kind}; H={heads} K={kv_heads} D={head_dim} page={page} "
          f"{jnp.dtype(dtype).name}", flush=True)
    triton_reason = triton_unavailable_reason()
    if triton_reason is not None:
        print(f"triton kernel skipped: {triton_reason}")
    results = []
    for spec in rows.split(","):
        b, hist, chunk = (int(x) for x in spec.split("x"))
        q, k, v, tables, q_lens, lengths = make_row(b, hist, chunk, heads, kv_heads, head_dim,
                                                    page, dtype)
        q_pos = (lengths - q_lens)[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        xla = jax.jit(paged_attention_reference)
        want = xla(q, k, v, tables, q_pos)
        flops = causal_flops(b, hist, chunk, heads, head_dim)
        t_xla = time_queued(xla, [(q, k, v, tables, q_pos)], iters=iters, reps=reps)
        row: dict[str, Any] = {"row": spec, "xla_s": t_xla, "xla_tflops": flops / t_xla / 1e12,
                               "kernel": []}
        print(f"{spec:>12}  xla {t_xla * 1e6:9.0f} us {row['xla_tflops']:6.1f} TFLOP/s",
              flush=True)
        kernels: list[tuple[str, Any, dict[str, int]]] = [
            ("pallas", paged_prefill_attention, {**st, "interpret": interpret})
            for st in SETTINGS if args.pallas]
        if triton_reason is None:
            kernels += [("triton", triton_paged_prefill_attention, st) for st in triton_settings]
        for name, kernel, setting in kernels:
            try:
                def fn(*a: jax.Array, kernel: Any = kernel, s: dict[str, int] = setting
                       ) -> jax.Array:
                    return kernel(*a, **s)
                got = fn(q, k, v, tables, q_lens, lengths)
                t = time_queued(fn, [(q, k, v, tables, q_lens, lengths)], iters=iters, reps=reps)
            except Exception as err:  # a setting that does not compile: report, go on
                print(f"{'':>12}  {name} {setting}: ERR {type(err).__name__}: {err}"[:300])
                continue
            diff = np.asarray(got, np.float32) - np.asarray(want, np.float32)
            rel = float(np.linalg.norm(diff) / np.linalg.norm(np.asarray(want, np.float32)))
            shown = {k: v for k, v in setting.items() if k != "interpret"}
            entry = {"kernel": name, **shown, "s": t, "tflops": flops / t / 1e12,
                     "speedup_vs_xla": t_xla / t, "rel_err_vs_xla": rel}
            row["kernel"].append(entry)
            print(f"{'':>12}  {name} {shown} {t * 1e6:9.0f} us {entry['tflops']:6.1f} "
                  f"TFLOP/s  {entry['speedup_vs_xla']:5.2f}x xla  err {rel:.1e}", flush=True)
        results.append(row)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "chunked_prefill.json")
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
