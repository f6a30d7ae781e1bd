"""The shared timing and bandwidth yardstick."""

from __future__ import annotations

import math
import time

import pytest

from kvjax.analysis.bandwidth import copy_bandwidth, read_bandwidth, time_queued


def test_time_queued_measures_per_call_time_and_warms_every_arg_set() -> None:
    seen: list[int] = []

    def slow(i: int) -> int:
        seen.append(i)
        time.sleep(0.01)
        return i

    seconds = time_queued(slow, [(0,), (1,), (2,)], iters=4, reps=3)
    assert 0.01 <= seconds < 0.05
    assert seen[:3] == [0, 1, 2]  # warm-up runs each set once
    assert seen[3:7] == [0, 1, 2, 0]  # then cycles through them
    assert len(seen) == 3 + 4 * 3


@pytest.mark.parametrize(("kw", "sets"), [({"iters": 0}, [()]), ({"reps": 0}, [()]), ({}, [])])
def test_time_queued_rejects_bad_arguments(kw: dict, sets: list) -> None:
    with pytest.raises(ValueError, match="iters and reps"):
        time_queued(lambda: None, sets, **kw)


def test_bandwidths_are_finite_and_positive() -> None:
    for bw in (read_bandwidth(8, iters=2, reps=2), copy_bandwidth(8, iters=2, reps=2)):
        assert math.isfinite(bw) and bw > 1e6
