"""The fused decode-layer kernels alone, at the Qwen2.5-0.5B decode shapes (GPU).

For 8 and 32 rows (``--batches``; bf16): ``norm_qkv_rope``, ``matmul_residual`` as the o
projection (896 -> 896) and as the down projection (4864 -> 896) and ``norm_gate_up``
(896 -> 2 x 4864), each over a grid of launch settings (``GRIDS``: 21 by default, every
combination with ``--full-grid``), against the same math in XLA (the jnp
references, jitted). Each call reads one of 24 weight sets in turn (as the 24 layers
do, so the weights do not stay in L2). Times are GPU kernel time per call from a
profiler trace of a 24-call chain (``chained_calls``; where the output is not the first
argument's shape, the chain adds one tiny elementwise kernel a call, in both columns),
and each row gives the weight bytes over that time as a share of the read bandwidth
measured in the same run. (The slope of ``time_chained`` is too noisy for calls of a few
microseconds: the programs' fixed cost varies by more than 24 such calls take.)

The kernels launch as ``KVJAX_TRITON_LAUNCH`` says (``pallas_kernels.triton_launch``):
XLA compiles the ``xla`` launches with its own Triton, so their settings may differ.

``--launch-out FILE`` writes the ``kvjax.models.fused_decode.FusedLaunch`` these
measurements pick: per layer piece, the setting with the least time summed over the
batches, or ``"xla"`` where XLA's kernels for the same math took less
(``decode_step_profile.py --attention fused=FILE``, ``engine_vs_hf.py --fused-launch FILE``
and ``FusedLaunch.from_json`` read it).

GPU: python benchmarks/fused_layer_kernels.py --out $OUT/fused_layer_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import chained_calls, read_bandwidth
from kvjax.analysis.gpu_trace import gpu_kernel_events, kernel_summary
from kvjax.models.fused_decode import XLA, FusedLaunch
from pallas_kernels import triton_fused_layer as tfl
from pallas_kernels.triton_launch import triton_launcher

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 896, 4864, 14, 2, 64, 24
BF16 = jnp.bfloat16
PIECES = {"down_proj": "down", "norm_gate_up": "gate_up", "o_proj": "o_proj",
          "norm_qkv_rope": "qkv"}  # benchmark case -> FusedLaunch piece, in the order
# swept (the largest weights first)


def _weights(key: int, shape: tuple[int, ...]) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(key), LAYERS)
    return [(jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(BF16)
            for k in keys]


_Grid = list[dict[str, int]]
_FULL_MM = [dict(block_n=n, block_k=bk_, num_stages=st, split_k=sk)
            for n, bk_, st, sk in itertools.product((16, 32, 64), (128, 512), (3, 4), (1, 4, 8))]
GRIDS: dict[str, tuple[_Grid, _Grid, _Grid, _Grid]] = {  # q/k/v, o proj, down proj, gate/up
    # every combination (about 5 s a setting on an H100: over 20 minutes for both batches)
    "full": (
        [dict(block_k=bk_, num_stages=st, num_warps=w, split_k=sk)
         for bk_, st, w, sk in itertools.product((128, 256), (3, 4), (4, 8), (1, 2, 4, 7))],
        _FULL_MM, _FULL_MM,
        [dict(block_n=n, block_k=bk_, num_stages=st, num_warps=w)
         for n, bk_, st, w in itertools.product((16, 32, 64), (128, 256), (3, 4), (4, 8))]),
    # the 2026-12-06 sweep's best per kernel and the split contractions around it (21;
    # each compiles for sm_90 within the shared memory at 8 and 32 rows, bf16)
    "quick": (
        [dict(block_k=256, split_k=sk) for sk in (1, 2, 4)]  # 896 = 3.5 steps of 256
        + [dict(block_k=128, split_k=sk) for sk in (1, 4, 7)],
        [dict(block_n=16, block_k=512), dict(block_n=16, block_k=128),
         dict(block_n=16, block_k=128, split_k=4), dict(block_n=16, block_k=128, split_k=7),
         dict(block_n=32, block_k=128, split_k=4)],
        [dict(block_n=32, block_k=512), dict(block_n=32, block_k=512, split_k=4),
         dict(block_n=32, block_k=512, split_k=8), dict(block_n=32, block_k=128, split_k=8),
         dict(block_n=64, block_k=256, split_k=8), dict(block_n=16, block_k=256, split_k=8)],
        [dict(block_n=64, block_k=128, num_warps=8), dict(block_n=32, block_k=128, num_warps=8),
         dict(block_n=32, block_k=128, num_warps=4), dict(block_n=16, block_k=128, num_warps=4)]),
}


def cases(batch: int, full_grid: bool = False) -> dict[str, tuple[Callable[..., Any], Callable[..., Any],
                                          list[tuple[Any, ...]], list[dict[str, int]], int]]:
    """name -> (kernel(settings) -> fn, xla fn, arg sets, settings grid, weight bytes);
    the grids of ``GRIDS["full"]`` or ``GRIDS["quick"]``."""
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.standard_normal((batch, HIDDEN)), BF16)
    nw = jnp.asarray(rng.standard_normal(HIDDEN), BF16)
    half = HEAD_DIM // 2
    cos = jnp.asarray(np.cos(rng.uniform(0, 6, (batch, half))), jnp.float32)
    sin = jnp.asarray(np.sin(rng.uniform(0, 6, (batch, half))), jnp.float32)
    wq, wk, wv = (_weights(s, (HIDDEN, n * HEAD_DIM)) for s, n in
                  ((1, HEADS), (2, KV_HEADS), (3, KV_HEADS)))
    bq, bk, bv = (jnp.asarray(rng.standard_normal(n * HEAD_DIM), BF16)
                  for n in (HEADS, KV_HEADS, KV_HEADS))
    wo, wd = _weights(4, (HIDDEN, HIDDEN)), _weights(5, (INTER, HIDDEN))
    wg, wu = _weights(6, (HIDDEN, INTER)), _weights(7, (HIDDEN, INTER))
    h = jnp.asarray(rng.standard_normal((batch, INTER)), BF16)
    a = jnp.asarray(rng.standard_normal((batch, HIDDEN)), BF16)
    sizes = lambda *ws: sum(int(w[0].nbytes) for w in ws)  # noqa: E731
    qkv_grid, mm_grid, down_grid, gu_grid = GRIDS["full" if full_grid else "quick"]
    return {
        "norm_qkv_rope": (
            lambda st: lambda x_, q, k, v: tfl.norm_qkv_rope(
                x_, nw, q, k, v, bq, bk, bv, cos, sin, head_dim=HEAD_DIM, eps=1e-6, **st),
            lambda x_, q, k, v: tfl.norm_qkv_rope_reference(
                x_, nw, q, k, v, bq, bk, bv, cos, sin, head_dim=HEAD_DIM, eps=1e-6),
            [(x, q, k, v) for q, k, v in zip(wq, wk, wv, strict=True)], qkv_grid,
            sizes(wq, wk, wv)),
        "o_proj": (
            lambda st: lambda r, w: tfl.matmul_residual(a, w, None, r, **st),
            lambda r, w: tfl.matmul_residual_reference(a, w, None, r),
            [(x, w) for w in wo], mm_grid, sizes(wo)),
        "down_proj": (
            lambda st: lambda r, w: tfl.matmul_residual(h, w, None, r, **st),
            lambda r, w: tfl.matmul_residual_reference(h, w, None, r),
            [(x, w) for w in wd], down_grid, sizes(wd)),
        "norm_gate_up": (
            lambda st: lambda x_, g, u: tfl.norm_gate_up(x_, nw, g, u, eps=1e-6, **st),
            lambda x_, g, u: tfl.norm_gate_up_reference(x_, nw, g, u, eps=1e-6),
            [(x, g, u) for g, u in zip(wg, wu, strict=True)], gu_grid, sizes(wg, wu)),
    }


def kernel_seconds(fn: Callable[..., Any], arg_sets: list[tuple[Any, ...]]) -> float:
    """GPU kernel time per call of a traced 24-call chain."""
    chain = chained_calls(fn, 24)
    sets = tuple(arg_sets)
    jax.block_until_ready(chain(sets))
    summary = kernel_summary(gpu_kernel_events(lambda: chain(sets)), 24)
    return float(summary["kernel_us_per_step"]) * 1e-6


def pick_launch(rows: list[dict[str, Any]], batches: list[int]
                ) -> tuple[FusedLaunch, dict[str, Any]]:
    """Per piece, the settings measured at every batch with the least summed time, or
    XLA where its summed time is less. Returns (the launch, per piece: the choice, its
    summed us and XLA's)."""
    chosen: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for case, piece in PIECES.items():
        sums: dict[str, list[float]] = {}
        xla_us: dict[int, float] = {}
        for r in rows:
            if r["kernel"] == case:
                sums.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r["us"])
                xla_us[r["batch"]] = r["xla_us"]
        complete = {k: sum(v) for k, v in sums.items() if len(v) == len(batches)}
        if not complete or len(xla_us) != len(batches):
            continue  # not measured at every batch: keep the default
        best = min(complete, key=lambda k: complete[k])
        t_xla = sum(xla_us.values())
        chosen[piece] = XLA if t_xla < complete[best] else json.loads(best)
        detail[piece] = {"choice": chosen[piece], "kernel_us_sum": complete[best],
                         "kernel_settings": json.loads(best), "xla_us_sum": t_xla}
    return FusedLaunch.from_dict(chosen), detail


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--out", default=None)
    ap.add_argument("--full-grid", action="store_true",
                    help="every combination of settings (GRIDS['full'], 20+ minutes) instead "
                         "of the 21 of GRIDS['quick']")
    ap.add_argument("--launch-out", default=None,
                    help="write the FusedLaunch these measurements pick (JSON)")
    args = ap.parse_args()
    bw = read_bandwidth()
    print(f"{jax.devices()[0].device_kind}; read bandwidth {bw / 1e9:.0f} GB/s; kernels "
          f"launched by {triton_launcher()}", flush=True)
    rows: list[dict[str, Any]] = []
    case_sets = {batch: cases(batch, args.full_grid) for batch in args.batches}
    for name in PIECES:  # piece by piece, every batch: a run cut short keeps whole pieces
        for batch in args.batches:
            kernel, xla, arg_sets, grid, nbytes = case_sets[batch][name]
            t_xla = kernel_seconds(xla, arg_sets)
            best: dict[str, Any] | None = None
            for st in grid:
                try:
                    t = kernel_seconds(kernel(st), arg_sets)
                except Exception as err:  # a setting that does not compile: report, go on
                    print(f"  {batch:>3} {name:<13} {st}: {type(err).__name__}"[:200])
                    continue
                row = {"batch": batch, "kernel": name, "settings": st, "us": 1e6 * t,
                       "xla_us": 1e6 * t_xla, "bw_share": nbytes / t / bw,
                       "speedup_vs_xla": t_xla / t}
                rows.append(row)
                if best is None or t < best["us"] / 1e6:
                    best = row
            if best is not None:
                print(f"  {batch:>3} {name:<13} xla {1e6 * t_xla:6.2f} us ({nbytes / t_xla / bw:4.0%})"
                      f" | best {best['us']:6.2f} us ({best['bw_share']:4.0%}), "
                      f"{best['speedup_vs_xla']:.2f}x xla, {best['settings']}", flush=True)
        write(args, bw, rows, PIECES[name])


def write(args: argparse.Namespace, bw: float, rows: list[dict[str, Any]], piece: str) -> None:
    """The rows so far (``--out``) and the launch they pick (``--launch-out``); prints the
    pick of ``piece``, the one just measured."""
    device = jax.devices()[0].device_kind
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "launch": triton_launcher(),
                                              "read_bandwidth": bw, "rows": rows}, indent=1))
    if args.launch_out:
        launch, detail = pick_launch(rows, args.batches)
        if piece in detail:
            d = detail[piece]
            print(f"  pick {piece:<8} {d['choice']}  (kernel {d['kernel_us_sum']:.2f} us vs "
                  f"xla {d['xla_us_sum']:.2f} us, summed over batches {args.batches})")
        Path(args.launch_out).write_text(json.dumps(
            {"device": device, "launch": triton_launcher(), "batches": args.batches,
             "fused_launch": launch.to_dict(), "pieces": detail}, indent=1))


if __name__ == "__main__":
    main()
