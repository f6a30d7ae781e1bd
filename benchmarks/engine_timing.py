"""Timing the serving engine's decode, shared by the engine benchmarks (GPU or CPU).

``offline_run`` steps an engine through a batch of requests present at once and times
its decode phase; ``bare_step_ms`` times the engine's decode burst alone, queued back to
back, as the reference the engine's own rate is compared with.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import time_queued
from kvjax.engine.engine import Engine, _engine_decode_burst
from kvjax.engine.sampling import GREEDY, SamplingArrays
from kvjax.models.fused_decode import FusedLaunch
from kvjax.models.llama import Decoder

BLOCK = 16


def tok_rate(tokens: float, seconds: float) -> float:
    """tokens / seconds; NaN when the time difference it comes from is not positive."""
    return tokens / seconds if seconds > 0 else float("nan")


def offline_run(engine: Engine, prompts: np.ndarray, new: int) -> dict[str, Any]:
    """Every prompt added at t0 (``new`` tokens each), stepped to the end: TTFT until
    every request's first token ("all") and its mean, total seconds, the decode phase
    (the steps after the last first token: their tokens and seconds, tok/s), steps taken
    and each request's tokens."""
    t0 = time.perf_counter()
    rids = [engine.add_request(p.tolist(), max_new_tokens=new, arrival_time=t0)
            for p in prompts]
    first: dict[int, float] = {}
    steps: list[tuple[float, int]] = []
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter()
        for rid, _ in events:
            first.setdefault(rid, now)
        steps.append((now, len(events)))
    end = time.perf_counter()
    t_all = max(first.values())
    after = sum(n for t, n in steps if t > t_all)
    return {"ttft_all_ms": (t_all - t0) * 1e3,
            "ttft_mean_ms": float(np.mean([t - t0 for t in first.values()])) * 1e3,
            "total_s": end - t0, "decode_tokens": after, "decode_s": end - t_all,
            "decode_tok_s": tok_rate(after, end - t_all), "steps": len(steps),
            "tokens": [engine.finished[r].tokens[0] for r in rids]}


def bare_step_ms(model: Decoder, params: Any, batch: int, context: int, steps: int,
                 width: int, attention: str, reps: int, *,
                 fused: FusedLaunch | None = None) -> float:
    """ms per token step of bursts queued back to back, ``batch`` rows at ``context`` over
    tables ``width`` columns wide (the rows' own pages first, -1 after); ``fused``: the
    fused decode-layer kernels' burst at this launch (``Engine(fused_decode=True)``)."""
    cfg = model.cfg
    need = -(-(context + steps) // BLOCK)
    shape = (cfg.num_layers, batch * need, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    state = {"k": jax.random.normal(jax.random.key(1), shape, jnp.bfloat16),
             "v": jax.random.normal(jax.random.key(2), shape, jnp.bfloat16)}
    tables = np.full((batch, width), -1, np.int32)
    tables[:, :need] = np.arange(batch * need, dtype=np.int32).reshape(batch, need)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, batch).astype(np.int32)
    rest = (tokens, np.full((batch,), context, np.int32), np.full((batch,), steps, np.int32),
            tables, SamplingArrays.from_params([GREEDY] * batch),
            np.zeros((batch,), np.uint32), np.zeros((batch,), np.int32))

    def call() -> jax.Array:
        ids, state["k"], state["v"] = _engine_decode_burst(
            model, params, state["k"], state["v"], *rest, steps=steps, all_greedy=True,
            attention=attention, fused=fused)
        return ids

    return time_queued(call, [()], iters=10, reps=reps) / steps * 1e3
