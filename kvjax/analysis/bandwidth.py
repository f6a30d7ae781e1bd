"""Measured device memory bandwidth and back-to-back timing, shared by experiments and
benchmarks so every "share of bandwidth" figure uses the same yardstick.

Read bandwidth streams a large float32 array through a column reduction (each byte read
once, almost nothing written); copy bandwidth counts the bytes read plus written by an
elementwise scale. Calls are queued back to back (no host sync between them) and the
median over repeats is reported, so host dispatch overlaps device work; for calls
shorter than their dispatch, ``time_chained`` runs them inside one program instead.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def chained_calls(fn: Callable[..., Any], iters: int) -> Callable[..., jax.Array]:
    """A jitted ``sets -> scalar`` that makes ``iters`` dependent calls of ``fn``, call
    ``i`` on ``sets[i % len(sets)]`` (see ``time_chained``); returns element 0 of the
    last call's first output leaf, as float32."""

    @jax.jit
    def chain(sets: tuple[tuple[Any, ...], ...]) -> jax.Array:
        link = jnp.zeros((), jnp.float32)
        fed: jax.Array | None = None
        for i in range(iters):
            args = sets[i % len(sets)]
            first = fed if fed is not None else args[0] + (link * 0).astype(args[0].dtype)
            out = jax.tree.leaves(fn(first, *args[1:]))[0]
            fits = out.shape == args[0].shape and out.dtype == args[0].dtype
            fed = out if fits else None
            link = jnp.ravel(out)[0].astype(jnp.float32)
        return link

    return chain


@dataclasses.dataclass(frozen=True)
class ChainedSlope:
    """Seconds per call from paired chains (``chained_slope``): the median of the pairs'
    slopes and their quartiles, over ``pairs`` pairs."""

    median: float
    low: float  # 25th percentile
    high: float  # 75th percentile
    pairs: int


def chained_slope(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], *,
                  iters: int = 30, reps: int = 5) -> ChainedSlope:
    """Seconds per call of ``fn`` run back to back on the device, with its spread.

    Programs of ``iters`` and of ``2 * iters`` chained calls (``chained_calls``) run in
    alternation, ``reps`` times each; each pair gives a slope, (long - short) / ``iters``,
    and the result is the median slope and its quartiles. Alternating the two lengths
    keeps a drift of the machine (clocks, another process) out of the difference.

    Host dispatch (tens of microseconds per jitted call) is out of the measurement:
    ``time_queued`` only hides it while each call runs longer than its dispatch. The
    calls are unrolled (no device loop, whose per-iteration predicate costs a sync),
    cycle through ``arg_sets``, and are chained so that none can be merged or skipped.
    When ``fn``'s first output leaf has its first argument's shape and dtype (a decode
    kernel's output and its queries), that output *is* the next call's first argument:
    the calls follow each other with nothing launched between them, as layers of a model
    do. Otherwise call ``i``'s first argument is perturbed by ``0 * (a value of call
    i-1's output)``, one tiny elementwise kernel per call, which the figure includes.
    Taking the difference of two chain lengths removes what a program costs once (its
    launch, the final sync and transfer: about half a millisecond on an H100 host, 16 us
    a call when divided over 30 calls). ``fn``'s first argument and first output leaf
    must be floating-point arrays.
    """
    if iters < 1 or reps < 1 or not arg_sets:
        raise ValueError("iters and reps must be >= 1 and arg_sets non-empty")
    sets = tuple(tuple(a) for a in arg_sets)
    short, long = chained_calls(fn, iters), chained_calls(fn, 2 * iters)
    for chain in (short, long):
        jax.block_until_ready(chain(sets))  # compile and warm up

    def seconds(chain: Callable[..., jax.Array]) -> float:
        start = time.perf_counter()
        jax.block_until_ready(chain(sets))
        return time.perf_counter() - start

    slopes = []
    for _ in range(reps):
        t_short = seconds(short)
        slopes.append((seconds(long) - t_short) / iters)
    low, mid, high = (float(np.percentile(slopes, q)) for q in (25, 50, 75))
    return ChainedSlope(median=mid, low=low, high=high, pairs=reps)


def time_chained(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], *,
                 iters: int = 30, reps: int = 5) -> float:
    """``chained_slope``'s median: seconds per call of ``fn`` run back to back."""
    return chained_slope(fn, arg_sets, iters=iters, reps=reps).median


def time_cuda_events(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], *,
                     iters: int = 30, reps: int = 5) -> float:
    """``time_queued`` for PyTorch on CUDA: median seconds per call of ``fn`` over
    ``iters`` calls launched back to back, timed by CUDA events (torch imported here)."""
    import torch

    if iters < 1 or reps < 1 or not arg_sets:
        raise ValueError("iters and reps must be >= 1 and arg_sets non-empty")
    for args in arg_sets:
        fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for i in range(iters):
            fn(*arg_sets[i % len(arg_sets)])
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
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
