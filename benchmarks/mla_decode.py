"""Absorbed MLA decode over paged latent rows on one GPU: kvjax's Pallas kernel against
the XLA gather path and PyTorch absorbed attention (two batched matmuls) on a dense
latent cache, in one process.

DeepSeek-V2 attention shape: 128 query heads (``--heads``), latent rank 512, RoPE key
width 64 (rows of 576 values), bf16, page 16, scrambled block tables, every sequence
full. Each query head scores the rows directly (``q_lat . c + q_rope . k_rope``) and
attends over the latent, so every row is read once per sequence. Prints time per call
(queued back to back), achieved TFLOP/s (at 128 heads the path is compute-bound) and
the latent bytes read as a share of the read bandwidth
measured in the same run, plus speedups over the baselines. Writes JSON to $OUT (or /tmp).

Run: python benchmarks/mla_decode.py [--rows 8x4096,...] [--heads 16]
CPU smoke run (interpreted, tiny): python benchmarks/mla_decode.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import read_bandwidth, time_cuda_events, time_queued
from pallas_kernels.mla_decode import mla_decode_attention, mla_decode_reference

RANK, ROPE, PAGE = 512, 64, 16
# heads per program x pages per step x warps; the last is the first H100 run's only
# compiling launch (every head in one program: 0.3x XLA, docs/mla.md)
SETTINGS = tuple({"heads_per_block": h, "pages_per_block": p, "num_warps": w}
                 for h, p, w in ((16, 2, 4), (16, 2, 8), (16, 4, 8), (32, 2, 8), (64, 2, 8),
                                 (128, 2, 4)))


def make_row(batch: int, context: int, heads: int, rank: int, rope: int, page: int,
             dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    """q_lat [B, H, r], q_rope [B, H, dr], pages [P, S, r + dr], tables [B, M], lengths [B]."""
    rng = np.random.default_rng(seed)
    blocks = -(-context // page)
    keys = jax.random.split(jax.random.key(seed), 3)
    q_lat = jax.random.normal(keys[0], (batch, heads, rank), dtype)
    q_rope = jax.random.normal(keys[1], (batch, heads, rope), dtype)
    pages = jax.random.normal(keys[2], (batch * blocks, page, rank + rope), dtype)
    tables = jnp.asarray(rng.permutation(batch * blocks).reshape(batch, blocks), jnp.int32)
    return q_lat, q_rope, pages, tables, jnp.full((batch,), context, jnp.int32)


def torch_absorbed_dense(batch: int, context: int, heads: int, rank: int, rope: int,
                         scale: float) -> Any:
    """Seconds per call of PyTorch absorbed attention over a dense latent cache (two
    batched matmuls around a float32 softmax; the one latent head is never expanded), or
    a string saying why not."""
    try:
        import torch
        if not torch.cuda.is_available():
            return "skipped: no CUDA torch"
        q = torch.randn(batch, heads, rank + rope, device="cuda", dtype=torch.bfloat16)
        rows = [torch.randn(batch, context, rank + rope, device="cuda", dtype=torch.bfloat16)
                for _ in range(2)]

        def attend(r: Any) -> Any:
            s = torch.bmm(q, r.transpose(1, 2)).float() * scale  # [B, H, T]
            return torch.bmm(torch.softmax(s, dim=-1).to(r.dtype), r[..., :rank])

        seconds = time_cuda_events(attend, [(r,) for r in rows])
        del rows
        torch.cuda.empty_cache()
        return seconds
    except Exception as err:  # report and go on
        return f"error: {type(err).__name__}: {str(err)[:160]}"


def run_row(batch: int, context: int, heads: int, rank: int, rope: int, page: int,
            dtype: Any, interpret: bool, baselines: bool) -> dict[str, Any]:
    sets = [make_row(batch, context, heads, rank, rope, page, dtype, seed) for seed in range(3)]
    scale = (128 + rope) ** -0.5  # DeepSeek-V2: qk_nope_head_dim 128 + rope 64
    res: dict[str, Any] = {"batch": batch, "context": context, "heads": heads,
                           "bytes": batch * context * (rank + rope) * jnp.dtype(dtype).itemsize,
                           # two multiply-adds per cached value: scores (r + dr), output (r)
                           "flops": 2 * batch * context * heads * (2 * rank + rope)}
    ref = jax.jit(lambda *a: mla_decode_reference(*a, scale=scale))
    want = np.asarray(ref(*sets[0]), np.float32)
    for kw in SETTINGS:
        name = f"kvjax pallas hb{kw['heads_per_block']} ppb{kw['pages_per_block']} w{kw['num_warps']}"
        fn = jax.jit(lambda *a, kw=kw: mla_decode_attention(*a, scale=scale, interpret=interpret,
                                                            **kw))
        try:
            got = np.asarray(fn(*sets[0]), np.float32)
            res[name + " err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            res[name] = time_queued(fn, sets, iters=3 if interpret else 30)
        except Exception as err:  # one setting must not sink the table
            res[name] = f"error: {type(err).__name__}: {str(err)[:160]}"
    if baselines:
        res["xla gather+einsum"] = time_queued(ref, sets, iters=30)
        res["torch absorbed dense"] = torch_absorbed_dense(batch, context, heads, rank, rope,
                                                         scale)
    return res


def print_row(res: dict[str, Any], bw: float | None) -> None:
    print(f"\n{res['batch']} x {res['context']} ({res['heads']} heads): latent "
          f"{res['bytes'] / 2**20:.0f} MiB", flush=True)
    timed = {}
    for k, v in res.items():
        if k in ("batch", "context", "heads", "bytes", "flops"):
            continue
        if isinstance(v, float) and k.endswith("err"):
            print(f"  {k:<34}{v:9.1e}")
        elif isinstance(v, float):
            timed[k] = v
            share = f"  {100 * res['bytes'] / v / bw:5.1f}%" if bw else ""
            print(f"  {k:<34}{v * 1e6:9.1f} us{share}  {res['flops'] / v / 1e12:6.1f} TFLOP/s")
        else:
            print(f"  {k:<34}{v}")
    ours = {k: v for k, v in timed.items() if k.startswith("kvjax")}
    if ours:
        best = min(ours, key=ours.__getitem__)
        for base in ("xla gather+einsum", "torch absorbed dense"):
            if base in timed:
                print(f"  best ({best}) vs {base}: {timed[base] / ours[best]:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8x4096,32x4096,64x4096,32x16384")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, interpreted on CPU, no bandwidth share")
    args = ap.parse_args()
    if args.smoke:
        specs, heads, rank, rope, page = ["2x40"], 4, 32, 16, 8
        dtype, interpret, bw = jnp.float32, True, None
    else:
        specs, heads, rank, rope, page = args.rows.split(","), args.heads, RANK, ROPE, PAGE
        dtype, interpret = jnp.bfloat16, False
        bw = read_bandwidth(4096)
        print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, read bandwidth "
              f"{bw / 1e12:.2f} TB/s (percentages are of this)", flush=True)
    rows = []
    for spec in specs:
        b, s = (int(x) for x in spec.split("x"))
        res = run_row(b, s, heads, rank, rope, page, dtype, interpret, baselines=not args.smoke)
        rows.append(res)
        print_row(res, bw)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "mla_decode.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "read_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
