"""Where the serving engine's decode time goes beyond its bursts' own (GPU).

The engine's overlapped decode (``Engine(decode_steps=N, overlap_bursts=True)``) against
the same burst queued back to back, on a Qwen2.5-0.5B-shaped ``Decoder`` with random
bf16 weights, every request present at t = 0 (``batch x prompt``, ``--new`` tokens,
greedy). For each cell, in one process:

* the bare burst (``_engine_decode_burst``) queued back to back, ms per token step, with
  the block tables as wide as the rows need (``need`` columns) and as wide as the
  engine makes them (its power-of-two bucket): the cost of the wider table;
* the engine's decode window (from the last first token to the end, best of
  ``--repeats``): ms per token step, and where the host spent it (dispatching bursts,
  waiting for their ids, everything else: scheduling, booking, streaming);
* one more engine run under the profiler: over the decode window on the GPU (first
  decode kernel to the last kernel), the summed kernel time, the idle time between
  kernels and the longest idle gaps with the kernels on either side.

The window's time per step minus the bare burst's at the engine's table width is the
engine's own overhead; the traced idle time says how much of it is the GPU waiting.

GPU (H100, ~2 min): python benchmarks/engine_trace.py --out $OUT/engine_trace.json
CPU check (tiny): python benchmarks/engine_trace.py --tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from decode_step_profile import build
from engine_timing import BLOCK, bare_step_ms, offline_run

from kvjax.analysis.gpu_trace import gpu_kernel_events
from kvjax.engine.engine import Engine
from kvjax.models.llama import Decoder

DECODE_KERNEL = "paged_decode_append"  # a kernel name only decode bursts launch


class HostClock:
    """Seconds the engine's host thread spends dispatching bursts and waiting for ids
    (the engine's ``_run_burst`` and ``_collect`` wrapped on the instance)."""

    def __init__(self, engine: Engine) -> None:
        self.dispatch_s = self.collect_s = 0.0
        self.bursts = 0
        run_burst, collect = engine._run_burst, engine._collect

        def timed_run_burst(*a: Any) -> jax.Array:
            t = time.perf_counter()
            out = run_burst(*a)
            self.dispatch_s += time.perf_counter() - t
            self.bursts += 1
            return out

        def timed_collect(*a: Any) -> Any:
            t = time.perf_counter()
            out = collect(*a)
            self.collect_s += time.perf_counter() - t
            return out

        engine._run_burst = timed_run_burst  # type: ignore[method-assign,assignment]
        engine._collect = timed_collect  # type: ignore[method-assign,assignment]

    def reset(self) -> None:
        self.dispatch_s = self.collect_s = 0.0
        self.bursts = 0


def gpu_window(kernels: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """Busy and idle microseconds from the first decode kernel to the last kernel end,
    and the ``top`` longest idle gaps with their neighbours' names."""
    kernels = sorted(kernels, key=lambda k: k["ts"])
    first = next(i for i, k in enumerate(kernels) if DECODE_KERNEL in k["name"])
    # back up to the start of that burst: the kernels after the last idle gap > 50 us
    while first > 0 and kernels[first]["ts"] - (kernels[first - 1]["ts"]
                                                + kernels[first - 1]["dur"]) < 50:
        first -= 1
    window = kernels[first:]
    start, end = window[0]["ts"], max(k["ts"] + k["dur"] for k in window)
    gaps = []
    reach = window[0]["ts"] + window[0]["dur"]
    for prev, k in itertools.pairwise(window):
        if k["ts"] > reach:
            gaps.append((k["ts"] - reach, prev["name"][:60], k["name"][:60]))
        reach = max(reach, k["ts"] + k["dur"])
    busy = (end - start) - sum(g for g, _, _ in gaps)
    gaps.sort(reverse=True)
    return {"span_us": end - start, "busy_us": busy, "kernels": len(window),
            "idle_us": sum(g for g, _, _ in gaps),
            "gaps_over_20us": sum(1 for g, _, _ in gaps if g > 20),
            "idle_in_gaps_over_20us": sum(g for g, _, _ in gaps if g > 20),
            "top_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps[:top]]}


def run_cell(model: Decoder, params: Any, batch: int, prompt: int, a: argparse.Namespace,
             say: Callable[[str], None]) -> dict[str, Any]:
    steps, cfg = a.decode_steps, model.cfg
    need = -(-(prompt + a.new) // BLOCK)
    engine = Engine(model, params, num_blocks=a.max_batch * need + need, block_size=BLOCK,
                    max_batch=a.max_batch, prefill_chunk=prompt,
                    max_tokens_per_step=max(a.budget, prompt), decode_steps=steps,
                    overlap_bursts=True, attention=a.attention)
    width = engine._table_width(need)
    attention = engine.attention
    row: dict[str, Any] = {"batch": batch, "prompt": prompt, "new": a.new,
                           "decode_steps": steps, "table_width_engine": width,
                           "table_width_rows": need, "attention": attention}
    for name, w in (("bare_ms_rows_width", need), ("bare_ms_engine_width", width)):
        row[name] = bare_step_ms(model, params, batch, prompt + a.new // 2, steps, w,
                                 attention, a.reps)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt))
    clock = HostClock(engine)
    offline_run(engine, prompts, a.new)  # warm-up: compiles every shape
    runs = []
    for _ in range(a.repeats):
        clock.reset()
        r = offline_run(engine, prompts, a.new)
        r = {k: v for k, v in r.items() if k != "tokens"}
        r.update(dispatch_s=clock.dispatch_s, collect_s=clock.collect_s, bursts=clock.bursts)
        runs.append(r)
    best = min(runs, key=lambda r: r["decode_s"])
    per_step = best["decode_s"] / (best["decode_tokens"] / batch) * 1e3
    row.update(engine_ms_per_step=per_step, engine_window_ms=best["decode_s"] * 1e3,
               engine_tokens=best["decode_tokens"], host_dispatch_ms=best["dispatch_s"] * 1e3,
               host_collect_ms=best["collect_s"] * 1e3, bursts=best["bursts"],
               overhead_vs_bare=per_step / row["bare_ms_engine_width"] - 1)
    say(f"  {batch:>3}x{prompt:<5} bare {row['bare_ms_rows_width']:.3f} ms/step "
        f"(table {need}) {row['bare_ms_engine_width']:.3f} (table {width}); engine "
        f"{per_step:.3f} ms/step (+{row['overhead_vs_bare']:.1%}); host: dispatch "
        f"{row['host_dispatch_ms']:.2f} ms, collect {row['host_collect_ms']:.2f} ms over "
        f"{best['bursts']} bursts, window {row['engine_window_ms']:.2f} ms")
    try:
        window = gpu_window(gpu_kernel_events(lambda: offline_run(engine, prompts, a.new)))
    except (RuntimeError, StopIteration) as err:
        window = {"error": str(err) or "no decode kernel in the trace"}
    row["gpu_window"] = window
    if "error" not in window:
        say(f"      GPU over the decode window: span {window['span_us'] / 1e3:.2f} ms, busy "
            f"{window['busy_us'] / 1e3:.2f} ms, idle {window['idle_us'] / 1e3:.2f} ms "
            f"({window['gaps_over_20us']} gaps > 20 us: "
            f"{window['idle_in_gaps_over_20us'] / 1e3:.2f} ms)")
        for g in window["top_gaps"][:6]:
            say(f"        {g['us']:8.1f} us  after {g['after']}  before {g['before']}")
    else:
        say(f"      trace: {window['error']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["8x512", "32x512"])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.tiny:
        a.cells, a.new, a.max_batch, a.budget, a.repeats, a.reps = ["2x32"], 9, 4, 128, 1, 1
    model, params = build(None, a.tiny)
    record: dict[str, Any] = {"device": str(jax.devices()[0].device_kind),
                              "jax": jax.__version__, "cells": []}
    print(f"{record['device']}; jax {jax.__version__}", flush=True)
    for cell in a.cells:
        batch, prompt = (int(x) for x in cell.split("x"))
        record["cells"].append(run_cell(model, params, batch, prompt, a,
                                        lambda s: print(s, flush=True)))
        if a.out:
            Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
