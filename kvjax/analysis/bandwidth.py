"""Measured device memory bandwidth and back-to-back timing, shared by experiments and
benchmarks so every "share of bandwidth" figure uses the same yardstick.

Read bandwidth streams a large float32 array through a column reduction (each byte read
once, almost nothing written); copy bandwidth counts the bytes read plus written by an
elementwise scale. Calls are queued back to back (no host sync between them) and the
median over repeats is reported, so host dispatch overlaps device work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def time_queued(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], *,
                iters: int = 10, reps: int = 5) -> float:
    """Median seconds per call of ``fn``, ``iters`` calls queued per repeat.

    ``arg_sets`` are cycled through (distinct buffers defeat caching effects); every
    set is run once first to compile and warm up.
    """
    if iters < 1 or reps < 1 or not arg_sets:
        raise ValueError("iters and reps must be >= 1 and arg_sets non-empty")
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def read_bandwidth(mib: int = 4096, *, iters: int = 10, reps: int = 5) -> float:
    """Bytes per second read by a column sum over a ``mib`` MiB float32 array."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a.reshape(-1, 4096), axis=0))
    return x.nbytes / time_queued(f, [(x,)], iters=iters, reps=reps)


def copy_bandwidth(mib: int = 4096, *, iters: int = 10, reps: int = 5) -> float:
    """Bytes per second read plus written by ``a * c`` over a ``mib`` MiB float32 array."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.5)
    return 2 * x.nbytes / time_queued(f, [(x,)], iters=iters, reps=reps)
