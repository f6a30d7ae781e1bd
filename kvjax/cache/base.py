"""The one contract every KV cache layout implements.

A cache is a frozen pytree. The model calls, for each layer ``l`` of a step::

    out, cache = cache.update_and_attend(l, q, k, v, positions)

which stores the step's new K/V for layer ``l`` and returns attention of ``q`` over
everything the cache holds for that sequence up to each query's position. After the
last layer the model calls ``cache = cache.advance(positions)`` once, for bookkeeping
shared by all layers (lengths, slot positions). Both are pure: they return a new
cache and never mutate the old one, so a jitted step can donate the cache buffers.

``positions`` is int32 ``[B, T]``: the absolute position of each new token, or -1
for a padding token, which is neither stored nor attended to.
"""

from __future__ import annotations

from typing import Protocol, Self

import jax


class KVCache(Protocol):
    """Structural type of a KV cache layout (dense, concat, none, paged, ...)."""

    def update_and_attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                          positions: jax.Array) -> tuple[jax.Array, Self]:
        """Write layer ``layer``'s new K/V and attend.

        Shapes: q [B, T, H, D], k/v [B, T, K, D], positions [B, T] -> out [B, T, H, D].
        """
        ...

    def advance(self, positions: jax.Array) -> Self:
        """Per-step bookkeeping after all layers have written ``positions`` [B, T]."""
        ...


class LatentKVCache(Protocol):
    """Structural type of an MLA latent cache (dense latent, none, ...).

    Per token it stores one row of ``latent_width`` values (the compressed latent and the
    RoPE key heads, see ``kvjax.mla_config``) instead of per-head keys and values; the
    model expands or absorbs around it (``kvjax.models.mla``). ``advance`` is as above.
    """

    def update_and_read(self, layer: int, ckv: jax.Array, positions: jax.Array
                        ) -> tuple[jax.Array, jax.Array, Self]:
        """Write layer ``layer``'s new rows, then return every row the cache holds for it.

        Shapes: ckv [B, T, W], positions [B, T] -> rows [B, S, W] and their positions
        int32 [B, S] (-1 where a slot holds nothing), with S the cache's capacity.
        """
        ...

    def advance(self, positions: jax.Array) -> Self:
        """Per-step bookkeeping after all layers have written ``positions`` [B, T]."""
        ...
