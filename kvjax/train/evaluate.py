"""Evaluation: loss, and exact-match accuracy of the answers by task and distance.

Accuracy is teacher-forced: an answer counts as right when, at every answer token, the
argmax of the logits (given the true prefix) is that token. For a contiguous answer this
is exactly whether greedy decoding from the prompt reproduces the answer: greedy decoding
follows the true prefix until the first wrong argmax, so both fail at the same token (up
to exact ties in the logits). One forward per example replaces a decode loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.data.synthetic import TASKS, Example, collate
from kvjax.train.loop import Model, Params, token_losses


@partial(jax.jit, static_argnames=("model",))
def _score(model: Model, params: Params, tokens: jax.Array, valid: jax.Array,
           answer: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per example: (summed CE over real targets, real targets, summed CE over answer
    tokens, answer exactly right). tokens int32 [B, T]; valid, answer bool [B, T]."""
    ce, pred = token_losses(model, params, tokens)
    v, a = valid[:, 1:], answer[:, 1:]
    wrong = a & (pred != tokens[:, 1:])
    return (jnp.sum(ce * v, axis=1), jnp.sum(v, axis=1), jnp.sum(ce * a, axis=1),
            ~jnp.any(wrong, axis=1))


def evaluate(model: Model, params: Params, examples: Sequence[Example], seq_len: int,
             batch_size: int = 32) -> dict[str, Any]:
    """Scores of ``examples`` (padded to ``seq_len``).

    Returns ``loss`` (mean CE over all real tokens), ``answer_loss`` (mean CE over answer
    tokens), ``accuracy`` (fraction of answers exactly right), and ``by_distance``: one
    row per (task, distance) with its example count, accuracy and answer loss.
    """
    sums: dict[str, float] = defaultdict(float)
    groups: dict[tuple[str, int], list[tuple[bool, float, int]]] = defaultdict(list)
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        # Pad the last chunk with copies so every call has one shape (one compilation).
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch = collate(padded, seq_len)
        ce, n, answer_ce, right = jax.device_get(_score(
            model, params, jnp.asarray(batch.tokens), jnp.asarray(batch.valid),
            jnp.asarray(batch.answer)))
        for j, ex in enumerate(chunk):
            sums["ce"] += float(ce[j])
            sums["tokens"] += float(n[j])
            sums["answer_ce"] += float(answer_ce[j])
            sums["answer_tokens"] += ex.answer_len
            groups[(ex.task, ex.distance)].append((bool(right[j]), float(answer_ce[j]),
                                                   ex.answer_len))
    rows: list[dict[str, Any]] = [{"task": task, "distance": d, "examples": len(g),
             "accuracy": float(np.mean([r for r, _, _ in g])),
             "answer_loss": sum(c for _, c, _ in g) / sum(k for _, _, k in g)}
            for (task, d), g in sorted(groups.items(), key=lambda kv: (TASKS.index(kv[0][0]),
                                                                        kv[0][1]))]
    total = sum(r["examples"] for r in rows)
    return {"loss": sums["ce"] / sums["tokens"],
            "answer_loss": sums["answer_ce"] / sums["answer_tokens"],
            "accuracy": sum(r["accuracy"] * r["examples"] for r in rows) / total,
            "by_distance": rows}
