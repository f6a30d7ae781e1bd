"""The shared timing and bandwidth yardstick."""

from __future__ import annotations

import math
import time

import jax
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
    them (one dot each in the compiled program). An output shaped like the first argument
    is the next call's first argument (no kernel between calls): the chain's value is the
    float64 product of the whole sequence. Otherwise each call's input is perturbed by a
    value of the previous output and the chain returns the last call's value."""
    import re

    from kvjax.analysis.bandwidth import chained_calls, time_chained

    rng = np.random.default_rng(0)
    a, b, c = (jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32) for _ in range(3))
    sets = [(a, b), (a + 1, c)]
    chain = chained_calls(jnp.matmul, 7)
    hlo = chain.lower(tuple(sets)).compile().as_text()
    assert len(re.findall(r"= f32\[64,64\]\{[^}]*\} dot\(", hlo)) == 7
    want = np.asarray(a, np.float64)
    for i in range(7):  # fed through: set 1's first argument is never used
        want = want @ np.asarray(sets[i % 2][1], np.float64)
    np.testing.assert_allclose(float(chain(tuple(sets))), want[0, 0], rtol=1e-4)

    def narrow(x: jax.Array, y: jax.Array) -> jax.Array:  # [64, 3]: not fed through
        return x @ y[:, :3]

    perturbed = chained_calls(narrow, 7)
    assert len(re.findall(r"dot\(", perturbed.lower(tuple(sets)).compile().as_text())) == 7
    np.testing.assert_allclose(float(perturbed(tuple(sets))),
                               float((sets[0][0] @ sets[0][1])[0, 0]), rtol=1e-5)
    with pytest.raises(ValueError):
        time_chained(jnp.matmul, [], iters=4)


def test_time_chained_is_the_per_call_slope() -> None:
    """The difference of two chain lengths: positive, and for calls much longer than a
    program's fixed cost, close to the time of one call run alone."""
    from kvjax.analysis.bandwidth import time_chained

    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((384, 384)) / 20, jnp.float32)
    per_call = time_chained(jnp.matmul, [(a, a)], iters=6, reps=5)
    alone = time_queued(jax.jit(jnp.matmul), [(a, a)], iters=6, reps=5)
    assert 0 < per_call < 3 * alone


def test_chained_slope_pairs_the_two_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (short, long) pair gives its own slope; the result is their median and
    quartiles, not the difference of the two lengths' medians (1.2 here), so a drift
    between repeats stays out. The clock is scripted: short and long chains alternate."""
    import types

    from kvjax.analysis import bandwidth

    durations = [1.0, 2.0, 3.0, 4.2, 5.0, 5.9]  # short, long, short, long, ...
    readings, now = [], 0.0
    for d in durations:  # each timed run reads the clock at its start and its end
        readings += [now, now + d]
        now += d
    clock = iter(readings)
    monkeypatch.setattr(bandwidth, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    a = jnp.ones((8, 8), jnp.float32)
    got = bandwidth.chained_slope(jnp.matmul, [(a, a)], iters=2, reps=3)
    assert got.pairs == 3
    assert got.median == pytest.approx(1.0 / 2)
    assert got.low == pytest.approx(0.95 / 2) and got.high == pytest.approx(1.1 / 2)
