"""MHA/GQA -> GQA/MQA by mean-pooling K/V heads (Ainslie et al., "GQA", 2023).

The GQA paper builds a grouped checkpoint from a multi-head one by replacing the key and
value heads of each group with their mean, then uptrains briefly. Query head ``h`` reads
K/V head ``h // (num_heads // num_kv_heads)``, so the new head ``j`` replaces the
consecutive old heads ``j * f, ..., j * f + f - 1`` with ``f = old / new``. RoPE is linear
and the same for every head, so pooling the projection weights (and biases) pools the
rotated keys. Only ``k_proj`` and ``v_proj`` change; the cache shrinks by ``f``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig

Params = dict[str, Any]


def _pool_heads(w: Any, old: int, new: int, head_dim: int) -> jnp.ndarray:
    """Mean over each group of ``old // new`` heads along the last axis (``old * head_dim``
    wide), in float64, cast back to ``w``'s dtype."""
    x = np.asarray(w, np.float64)
    lead = x.shape[:-1]
    pooled = x.reshape(*lead, new, old // new, head_dim).mean(axis=-2)
    return jnp.asarray(pooled.reshape(*lead, new * head_dim), dtype=w.dtype)


def mean_pool_kv_heads(cfg: ModelConfig, params: Params,
                       num_kv_heads: int) -> tuple[ModelConfig, Params]:
    """The config and parameters of ``cfg``'s model with ``num_kv_heads`` K/V heads.

    ``num_kv_heads`` must divide ``cfg.num_kv_heads`` (1 = MQA). Parameters other than
    ``k_proj``/``v_proj`` are shared with ``params``, not copied.
    """
    old = cfg.num_kv_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) \
            or num_kv_heads <= 0 or old % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive divisor of the "
                         f"model's num_kv_heads={old}")
    out = dict(params)
    for i in range(cfg.num_layers):
        layer = dict(out[f"layers_{i}"])
        attn = dict(layer["self_attn"])
        for name in ("k_proj", "v_proj"):
            attn[name] = {leaf: _pool_heads(w, old, num_kv_heads, cfg.head_dim)
                          for leaf, w in attn[name].items()}
        layer["self_attn"] = attn
        out[f"layers_{i}"] = layer
    return dataclasses.replace(cfg, num_kv_heads=num_kv_heads), out
