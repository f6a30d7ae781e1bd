"""Preallocated dense cache: ``[layers, batch, max_len, n_kv, head_dim]`` plus lengths.

The token at position ``p`` of sequence ``b`` lives in slot ``p``. Writes are a
scatter into fixed-shape buffers, so a jitted step compiles once and, with the
cache donated, updates in place. Padding tokens (position -1) are dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import attend_by_position


def write_slots(positions: jax.Array, max_len: int) -> jax.Array:
    """Slot of each token, int32 [B, T]: its position; padding (-1) and positions past
    ``max_len`` map to ``max_len``, out of bounds, so a ``mode="drop"`` scatter drops them."""
    ok = (positions >= 0) & (positions < max_len)
    return jnp.where(ok, positions, max_len)


def slot_positions(batch: int, max_len: int) -> jax.Array:
    """Position held by each slot, int32 [B, S]: slot ``s`` holds position ``s``."""
    return jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))


def advanced_lengths(lengths: jax.Array, positions: jax.Array, max_len: int) -> jax.Array:
    """Stored tokens per sequence [B] after writing ``positions`` [B, T]: the old length or
    the last written position + 1, whichever is larger."""
    top = jnp.max(jnp.where(positions < max_len, positions, -1), axis=1) + 1
    return jnp.maximum(lengths, top)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
    """Fields:
      k, v: [L, B, S, K, D] with S = max_len.
      lengths: int32 [B], tokens stored per sequence (slots ``[0, length)`` are valid).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
             head_dim: int, dtype: jnp.dtype) -> DenseCache:
        """An empty cache holding up to ``max_len`` tokens per sequence."""
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    def update_and_attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                          positions: jax.Array) -> tuple[jax.Array, DenseCache]:
        """Scatter this step's K/V into their slots, then attend over slots ``<= position``.

        q [B, T, H, D], k/v [B, T, K, D], positions [B, T] -> [B, T, H, D].
        """
        b = jnp.arange(k.shape[0])[:, None]
        slots = write_slots(positions, self.max_len)
        new_k = self.k.at[layer, b, slots].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[layer, b, slots].set(v.astype(self.v.dtype), mode="drop")
        slot_pos = slot_positions(k.shape[0], self.max_len)
        out = attend_by_position(q, new_k[layer], new_v[layer], positions, slot_pos)
        return out, dataclasses.replace(self, k=new_k, v=new_v)

    def advance(self, positions: jax.Array) -> DenseCache:
        """lengths <- max(lengths, last written position + 1)."""
        return dataclasses.replace(self, lengths=advanced_lengths(self.lengths, positions,
                                                                  self.max_len))
