"""Preallocated dense MLA latent cache: ``[layers, batch, max_len, latent_width]`` + lengths.

One row per token and layer holds the compressed latent c_KV (``kv_lora_rank`` values)
followed by the decoupled RoPE key heads (``rope_key_heads * qk_rope_head_dim``), the
layout FlashMLA reads: the absorbed path attends over the whole row as an MQA key and
over its first ``kv_lora_rank`` values as the value, so nothing is stored twice.

As in ``DenseCache`` the token at position ``p`` lives in slot ``p``, writes are a
scatter into a fixed-shape buffer (a jitted step with the cache donated updates it in
place), and padding tokens (position -1) are dropped. See ``base.LatentKVCache``.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from kvjax.cache.dense import advanced_lengths, slot_positions, write_slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Fields:
      ckv: [L, B, S, W] with S = max_len and W = latent_width.
      lengths: int32 [B], tokens stored per sequence (slots ``[0, length)`` are valid).
    """

    ckv: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, latent_width: int,
             dtype: jnp.dtype) -> LatentCache:
        """An empty cache holding up to ``max_len`` tokens per sequence."""
        return cls(ckv=jnp.zeros((num_layers, batch, max_len, latent_width), dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return int(self.ckv.shape[2])

    def update_and_read(self, layer: int, ckv: jax.Array, positions: jax.Array
                        ) -> tuple[jax.Array, jax.Array, LatentCache]:
        """Scatter this step's rows into their slots; return layer ``layer``'s buffer.

        ckv [B, T, W], positions int32 [B, T] -> rows [B, S, W] (cache dtype), slot
        positions int32 [B, S] (slot ``s`` holds position ``s``), and the new cache.
        """
        b, t, w = ckv.shape
        chex.assert_shape(positions, (b, t))
        chex.assert_shape(self.ckv, (None, b, None, w))
        rows = jnp.arange(b)[:, None]
        new = self.ckv.at[layer, rows, write_slots(positions, self.max_len)].set(
            ckv.astype(self.ckv.dtype), mode="drop")
        return new[layer], slot_positions(b, self.max_len), dataclasses.replace(self, ckv=new)

    def advance(self, positions: jax.Array) -> LatentCache:
        """lengths <- max(lengths, last written position + 1)."""
        return dataclasses.replace(self, lengths=advanced_lengths(self.lengths, positions,
                                                                  self.max_len))
