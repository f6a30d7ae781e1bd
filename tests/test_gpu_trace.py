"""Kernel-trace summaries (the profiler part needs a GPU; on CPU it must say so)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kvjax.analysis.gpu_trace import gpu_kernel_events, kernel_summary


def test_kernel_summary_busy_span_and_top() -> None:
    """Two calls of two kernels with gaps: busy is the summed durations, span the first
    start to the last end, both per call; kernels ranked by total time."""
    events = [{"name": "a", "ts": 0.0, "dur": 10.0}, {"name": "b", "ts": 12.0, "dur": 3.0},
              {"name": "a", "ts": 20.0, "dur": 10.0}, {"name": "b", "ts": 33.0, "dur": 5.0}]
    s = kernel_summary(events, per=2, top=1)
    assert s["kernels_per_step"] == 2
    assert s["kernel_us_per_step"] == pytest.approx(14.0)  # (10 + 3 + 10 + 5) / 2
    assert s["span_us_per_step"] == pytest.approx(19.0)  # (38 - 0) / 2
    assert s["top"] == [{"name": "a", "us_per_step": 10.0, "calls_per_step": 1.0}]


def test_gpu_kernel_events_without_gpu_is_a_clear_error() -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no GPU events"):
        gpu_kernel_events(lambda: jnp.arange(8.0) * 2)
