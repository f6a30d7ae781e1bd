"""The shared timing and bandwidth yardstick."""

from __future__ import annotations

import math
import time

import jax.numpy as jnp
import numpy as np
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


def test_chained_calls_run_every_call() -> None:
    """Identical calls on the same inputs would be merged by XLA; the chain keeps all of
    them (one dot each in the compiled program) and returns a value of the last call."""
    import re

    from kvjax.analysis.bandwidth import chained_calls, time_chained

    a = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
    sets = [(a, a), (a + 1, a)]
    chain = chained_calls(jnp.matmul, 7)
    hlo = chain.lower(tuple(sets)).compile().as_text()
    assert len(re.findall(r"= f32\[64,64\]\{[^}]*\} dot\(", hlo)) == 7
    np.testing.assert_allclose(float(chain(tuple(sets))), float((a @ a)[0, 0]), rtol=1e-5)
    assert time_chained(jnp.matmul, sets, iters=4, reps=2) > 0
    with pytest.raises(ValueError):
        time_chained(jnp.matmul, [], iters=4)
