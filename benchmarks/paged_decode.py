"""Paged decode attention on one GPU: kvjax's kernels against the baselines, one run.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16, page 16,
random block tables, every sequence at full length). Columns, all in the same process:
kvjax's Pallas kernel and kvjax's Triton kernel through jax-triton (a few settings each),
JAX's built-in Pallas ``paged_attention`` (three settings), an XLA gather + einsum
(kvjax's reference) and PyTorch SDPA on a dense cache (not paged). Prints time per call
(by default dependent calls inside one program, each call's output the next call's
queries, so nothing runs between calls, timed as the slope between programs of 30 and 60
calls: ``kvjax.analysis.bandwidth.time_chained``;
``--timing queued`` queues jitted calls from Python; PyTorch is timed by CUDA events over
calls queued back to back) and KV bytes / time as a share of the read bandwidth
measured in the same run. A backend that cannot be imported is skipped with the reason;
one that fails to compile or run is reported and the run goes on. Writes JSON to $OUT
(or /tmp).

Run: python benchmarks/paged_decode.py [--rows 8x4096,32x1024,...]
     python benchmarks/paged_decode.py --sweep triton   (or pallas): a grid of one
     kernel's settings per row, without the baselines.
--budget-s (default 200) is shared by the rows: a row whose share is spent skips its
remaining kvjax settings (the baselines are always timed), so a run stays under about
5 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import (
    chained_calls,
    chained_slope,
    read_bandwidth,
    time_chained,
    time_cuda_events,
    time_queued,
)
from kvjax.analysis.gpu_trace import gpu_kernel_events, kernel_summary
from kvjax.cache.paged import paged_attention_reference
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.triton_paged_decode import (
    triton_paged_decode_attention,
    triton_unavailable_reason,
)

H, KV, D, PAGE = 32, 8, 128, 16
# Pallas: (pages_per_block, num_splits, num_warps, num_stages)
PallasSetting = tuple[int, int, int, int]
PALLAS: tuple[PallasSetting, ...] = ((8, 1, 4, 2), (8, 4, 4, 2), (4, 8, 4, 2), (16, 2, 4, 2))
PALLAS_SWEEP = tuple((ppb, sp, w, st) for ppb, sp in ((8, 1), (8, 2), (8, 4), (4, 8), (4, 16))
                     for w in (4, 8) for st in (2, 3))
# Triton: (block_tokens, num_splits (None = auto), num_warps, num_stages, prefetch_table);
# the first is the default launch.
TritonSetting = tuple[int, int | None, int, int, bool]
TRITON: tuple[TritonSetting, ...] = (
    (32, None, 4, 4, True), (32, None, 4, 4, False), (128, None, 4, 3, False),
    (64, None, 4, 4, True), (32, None, 2, 4, True))
TRITON_SWEEP: tuple[TritonSetting, ...] = tuple(
    (bt, sp, w, st, pf) for bt, stages in ((32, (4, 6)), (64, (3, 4)), (128, (3,)))
    for sp in (1, 2, 4, 8) for w in (4,) for st in stages for pf in (False, True))


def parse_triton_settings(spec: str) -> tuple[TritonSetting, ...]:
    """``"bt:sp:warps:stages:pf,..."`` (sp ``auto`` for the auto split, pf 0/1) -> settings."""
    settings = []
    for item in spec.split(","):
        bt, sp, w, st, pf = item.split(":")
        settings.append((int(bt), None if sp == "auto" else int(sp), int(w), int(st),
                         bool(int(pf))))
    return tuple(settings)


def triton_column(setting: TritonSetting) -> str:
    """The table's column name of a Triton setting (token-major pages)."""
    tokens, splits, warps, stages, pf = setting
    return f"kvjax triton bt{tokens} sp{splits or 'auto'} w{warps} st{stages}{' pf' * pf}"


class Budget:
    """Wall-clock budget: settings started after it is spent are skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.end


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a32 - b32) / np.linalg.norm(b32))


def _error(err: Exception) -> str:
    return f"ERR {type(err).__name__}: {str(err)[:200]}"


def torch_sdpa(b: int, s: int) -> float | str:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as err:
        return f"skipped: {err}"
    try:
        q = torch.randn(b, H, 1, D, device="cuda", dtype=torch.bfloat16)
        ks = [torch.randn(b, KV, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        vs = [torch.randn(b, KV, s, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        seconds = time_cuda_events(
            lambda k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            list(zip(ks, vs, strict=True)))
        del ks, vs
        torch.cuda.empty_cache()
        return seconds
    except Exception as err:  # report and go on
        return _error(err)


TIMERS = {"chained": time_chained, "queued": time_queued}
timer = time_chained  # set from --timing in main()
CHAINED_PAIRS = 9  # (30-call, 60-call) program pairs per chained figure
traced: set[str] = set()  # --trace: names of columns whose chained program is profiled


def trace_chain(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]],
                iters: int = 30) -> dict[str, float]:
    """Profile one run of ``iters`` chained calls: kernels, summed kernel time and span per
    call (the gaps between kernels are span minus busy)."""
    chain = chained_calls(fn, iters)
    sets = tuple(tuple(a) for a in arg_sets)
    jax.block_until_ready(chain(sets))
    summary = kernel_summary(gpu_kernel_events(lambda: chain(sets)), iters, top=4)
    return {"kernels_per_call": summary["kernels_per_step"],
            "busy_s": summary["kernel_us_per_step"] * 1e-6,
            "span_s": summary["span_us_per_step"] * 1e-6}


def time_kernel(res: dict[str, Any], name: str, fn: Callable[..., Any],
                arg_sets: Sequence[tuple[Any, ...]], expected: jax.Array | None,
                budget: Budget | None) -> None:
    """res[name] = seconds per call by ``timer`` (and res[name + " err"] vs ``expected``),
    or why not; kvjax settings pass the row's budget, baselines (always timed) None."""
    if budget is not None and budget.spent():
        res[name] = "skipped: time budget spent"
        return
    try:
        if expected is not None:
            res[name + " err"] = rel_err(fn(*arg_sets[0]), expected)
        if timer is time_chained:  # the slope's median, its quartiles beside it
            slope = chained_slope(fn, arg_sets, iters=30, reps=CHAINED_PAIRS)
            res[name] = slope.median
            res[name + " iqr"] = [slope.low, slope.high]
        else:
            res[name] = timer(fn, arg_sets, iters=30)
    except Exception as err:  # report and go on: one setting must not sink the table
        res[name] = _error(err)
        return
    if name in traced:
        try:
            res[name + " trace"] = trace_chain(fn, arg_sets)
        except Exception as err:  # the timing stands without its trace
            res[name + " trace"] = _error(err)


def run_row(b: int, s: int, pallas: Sequence[PallasSetting], triton: Sequence[TritonSetting],
            baselines: bool, budget: Budget, head_major: bool = False) -> dict[str, Any]:
    pages = b * s // PAGE
    key = jax.random.key(0)
    ours_sets, theirs_sets = [], []
    for _ in range(3):  # rotate inputs so repeated calls do not hit in L2
        k1, k2, k3, k4, key = jax.random.split(key, 5)
        q = jax.random.normal(k1, (b, H, D), jnp.bfloat16)
        kp = jax.random.normal(k2, (pages, PAGE, KV, D), jnp.bfloat16)  # token-major pages
        vp = jax.random.normal(k3, (pages, PAGE, KV, D), jnp.bfloat16)
        bt = jax.random.permutation(k4, pages).reshape(b, s // PAGE).astype(jnp.int32)
        lengths = jnp.full((b,), s, jnp.int32)
        ours_sets.append((q, kp, vp, bt, lengths))
        if baselines:
            theirs_sets.append((q, jnp.transpose(kp, (2, 0, 1, 3)),
                                jnp.transpose(vp, (2, 0, 1, 3)), bt, lengths))
    kv_bytes = 2 * b * s * KV * D * 2
    res: dict[str, Any] = {"batch": b, "context": s, "kv_bytes": kv_bytes}
    ref = jax.jit(lambda q, kp, vp, bt, ln: paged_attention_reference(
        q[:, None], kp, vp, bt, (ln - 1)[:, None])[:, 0])
    expected = ref(*ours_sets[0])
    # head-major copies of the same pages ([P, K, S, D]) for the --head-major columns
    layouts = [("token-major", "", ours_sets)] + [
        ("head-major", " hm", [(q, jnp.swapaxes(kp, 1, 2), jnp.swapaxes(vp, 1, 2), bt, ln)
                               for q, kp, vp, bt, ln in ours_sets])] * head_major
    kernels: list[list[tuple[str, Callable[..., Any], list[Any]]]] = [[
        (f"kvjax pallas ppb{ppb} sp{splits} w{warps} st{stages}",
         jax.jit(lambda *a, ppb=ppb, splits=splits, w=warps, st=stages:
                 paged_decode_attention(*a, pages_per_block=ppb, num_splits=splits,
                                        num_warps=w, num_stages=st)), ours_sets)
        for ppb, splits, warps, stages in pallas], [
        (triton_column((tokens, splits, warps, stages, pf)) + tag,
         jax.jit(lambda *a, bt=tokens, splits=splits, w=warps, st=stages, pf=pf, lay=layout:
                 triton_paged_decode_attention(*a, block_tokens=bt, num_splits=splits,
                                               num_warps=w, num_stages=st,
                                               prefetch_table=pf, page_layout=lay)), sets)
        for tokens, splits, warps, stages, pf in triton for layout, tag, sets in layouts]]
    # Alternate the two kernels so that a spent budget cuts both alike.
    for pair in itertools.zip_longest(*kernels):
        for name, fn, sets in filter(None, pair):
            time_kernel(res, name, fn, sets, expected, budget)
    res = dict(sorted(res.items(), key=lambda kv: not kv[0].startswith("kvjax pallas")))
    if not baselines:
        return res
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as builtin
    except ImportError as err:
        res["jax builtin"] = f"skipped: {err}"
    else:
        for name, kw in (("jax builtin default", {}),
                         ("jax builtin ks8 ppcb8", {"k_splits": 8, "pages_per_compute_block": 8}),
                         ("jax builtin ks32 ppcb4",
                          {"k_splits": 32, "pages_per_compute_block": 4})):
            fn = jax.jit(lambda *a, kw=kw: builtin.paged_attention(*a, **kw))
            time_kernel(res, name, fn, theirs_sets, None, None)
    time_kernel(res, "xla gather+einsum", ref, ours_sets, None, None)
    res["torch sdpa dense"] = torch_sdpa(b, s)
    return res


def _share(res: dict[str, Any], seconds: float, bw: float) -> float:
    return 100 * res["kv_bytes"] / seconds / bw


def print_row(res: dict[str, Any], bw: float, sweep: bool) -> None:
    print(f"\n{res['batch']} x {res['context']}: KV {res['kv_bytes'] / 2**20:.0f} MiB")
    for k, v in res.items():
        if k in ("batch", "context", "kv_bytes", "read_bandwidth") or (
                sweep and k.endswith("err")):
            continue
        if k.endswith(" iqr") and isinstance(v, list):
            print(f"    slope quartiles over {CHAINED_PAIRS} pairs: {v[0] * 1e6:.1f}-"
                  f"{v[1] * 1e6:.1f} us ({_share(res, v[1], bw):.1f}-"
                  f"{_share(res, v[0], bw):.1f}%)")
        elif k.endswith(" trace") and isinstance(v, dict):
            print(f"    trace: {v['kernels_per_call']:.1f} kernels/call, kernels busy "
                  f"{v['busy_s'] * 1e6:.1f} us ({_share(res, v['busy_s'], bw):.1f}%), span "
                  f"{v['span_s'] * 1e6:.1f} us a call")
        elif isinstance(v, float) and not k.endswith("err"):
            print(f"  {k:<38}{v * 1e6:9.1f} us  {_share(res, v, bw):5.1f}%")
        elif isinstance(v, float):
            print(f"  {k:<38}{v:9.1e}")
        else:
            print(f"  {k:<38}{v}")
    timed = {k: v for k, v in res.items() if isinstance(v, float) and not k.endswith("err")}
    best: dict[str, tuple[float, str]] = {}
    for column in ("kvjax pallas", "kvjax triton", "jax builtin"):
        entries = [(v, k) for k, v in timed.items() if k.startswith(column)]
        if entries:
            best[column] = min(entries)
            print(f"  best {column}: {best[column][1]} "
                  f"{_share(res, best[column][0], bw):.1f}%")
    for ours in ("kvjax pallas", "kvjax triton"):
        if ours in best and "jax builtin" in best:
            print(f"  best {ours} vs best builtin: "
                  f"{best['jax builtin'][0] / best[ours][0]:.2f}x faster")
    if "kvjax pallas" in best and "kvjax triton" in best:
        print(f"  best triton vs best pallas: "
              f"{best['kvjax pallas'][0] / best['kvjax triton'][0]:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8x4096,32x1024,32x4096,64x4096,32x16384")
    ap.add_argument("--sweep", choices=("pallas", "triton"),
                    help="time a grid of this kernel's settings, without the baselines")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="time budget of the run, shared evenly by the rows: a row stops "
                         "timing new kvjax settings when its share is spent")
    ap.add_argument("--timing", choices=tuple(TIMERS), default="chained",
                    help="chained: per call, the slope between programs of 30 and 60 "
                         "dependent calls (no host dispatch between them, a program's fixed "
                         "cost cancelled); queued: 30 jitted calls queued back to back from "
                         "Python (the 2026-11-23 tables)")
    ap.add_argument("--triton", type=parse_triton_settings,
                    help="the Triton settings to time, 'bt:sp:warps:stages:pf,...' (sp 'auto'; "
                         "pf 1 = prefetch_table), instead of the default list or sweep")
    ap.add_argument("--no-pallas", dest="pallas", action="store_false",
                    help="leave out the Pallas kernel's columns")
    ap.add_argument("--trace", action="store_true",
                    help="also profile the chained program of the first Triton setting, the "
                         "built-in ks8 and the XLA gather: kernel time vs gaps per call")
    ap.add_argument("--head-major", action="store_true",
                    help="also time every Triton setting on head-major pages [P, K, S, D] "
                         "(the same pages transposed; columns marked 'hm')")
    args = ap.parse_args()
    global timer
    timer = TIMERS[args.timing]

    specs = args.rows.split(",")
    reason = triton_unavailable_reason()
    bw = read_bandwidth(4096)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"read bandwidth {bw / 1e12:.2f} TB/s (percentages are of this), "
          f"timing {args.timing} (PyTorch: CUDA events)", flush=True)
    if reason is not None:
        print(f"kvjax triton column skipped: {reason}", flush=True)
    pallas = {None: PALLAS, "pallas": PALLAS_SWEEP, "triton": ()}[args.sweep]
    if not args.pallas:
        pallas = ()
    triton = {None: TRITON, "pallas": (), "triton": TRITON_SWEEP}[args.sweep]
    if args.triton:
        triton = args.triton
    if args.trace:
        traced.update(("jax builtin ks8 ppcb8", "xla gather+einsum"))
        if triton:
            traced.add(triton_column(triton[0]))
    if reason is not None:
        triton = ()
    # In the 2026-11-23 H100 run the first Triton setting timed in the process took 3.3x
    # as long as the identical launch timed later in the same row; one discarded pass of
    # the first row's first settings keeps any first-use cost out of the table.
    b0, s0 = (int(x) for x in specs[0].split("x"))
    run_row(b0, s0, pallas[:1], triton[:1], baselines=False, budget=Budget(float("inf")))
    rows = []
    for spec in specs:
        b, s = (int(x) for x in spec.split("x"))
        budget = Budget(args.budget_s / len(specs))
        try:
            res = run_row(b, s, pallas, triton, baselines=args.sweep is None, budget=budget,
                          head_major=args.head_major)
        except Exception as err:  # e.g. out of memory: report the row and go on
            print(f"\n{b} x {s}: {_error(err)}", flush=True)
            continue
        res["read_bandwidth"] = bw
        rows.append(res)
        print_row(res, bw, sweep=args.sweep is not None)
    out = os.environ.get("OUT", "/tmp")
    name = f"paged_decode{'_sweep_' + args.sweep if args.sweep else ''}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "triton_unavailable": reason, "read_bandwidth": bw,
                   "timing": args.timing, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
