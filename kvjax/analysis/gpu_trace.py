"""GPU kernel events of a call, from JAX's profiler trace (CUPTI timestamps).

``gpu_kernel_events`` runs a (warm) callable under ``jax.profiler.trace`` and returns the
GPU kernel events of the trace; ``kernel_summary`` reduces them to busy time (the sum of
kernel durations) and span (first kernel start to last kernel end) per unit of work. The
decode-step profile and the paged decode benchmark use them to tell a kernel's own time
from the gaps between kernels.
"""

from __future__ import annotations

import collections
import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax


def gpu_kernel_events(run: Callable[[], Any]) -> list[dict[str, Any]]:
    """``run()`` (blocked on) under the profiler; its GPU events ``{"name", "ts", "dur"}``
    (microseconds). Raises RuntimeError when the trace has no GPU events (no GPU, or no
    CUPTI)."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            jax.block_until_ready(run())
        files = list(Path(logdir).rglob("*.trace.json.gz")) + list(
            Path(logdir).rglob("perfetto_trace.json.gz"))
        if not files:
            raise RuntimeError(f"no trace json under {logdir}")
        with gzip.open(files[0], "rt") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower()}
    kernels = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"])}
               for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
    if not kernels:
        raise RuntimeError(f"no GPU events in the trace (processes: {sorted(set(names.values()))})")
    return kernels


def kernel_summary(kernels: list[dict[str, Any]], per: int, top: int = 24) -> dict[str, Any]:
    """Kernels, busy microseconds and span microseconds per ``per`` units of work (steps,
    calls), and the ``top`` kernels by total time."""
    start = min(k["ts"] for k in kernels)
    end = max(k["ts"] + k["dur"] for k in kernels)
    by_name: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for k in kernels:
        by_name[k["name"]] += k["dur"]
        counts[k["name"]] += 1
    return {"kernels_per_step": len(kernels) / per,
            "kernel_us_per_step": sum(k["dur"] for k in kernels) / per,
            "span_us_per_step": (end - start) / per,
            "top": [{"name": n[:90], "us_per_step": t / per, "calls_per_step": counts[n] / per}
                    for n, t in by_name.most_common(top)]}
