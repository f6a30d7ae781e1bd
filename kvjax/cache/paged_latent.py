"""Paged MLA latent cache: a shared pool of pages of latent rows, ``[L, P, page_size, W]``.

The paged layout of ``cache/paged.py`` (PagedAttention, Kwon et al., 2023) with MLA's
row (``W = latent_width`` values: c_KV and the RoPE key heads) in place of per-head
K/V: the token at position ``p`` of sequence ``b`` lives in page
``block_tables[b, p // page_size]`` at offset ``p % page_size``; table entries outside
``[0, P)`` mean "no page" (writes dropped, slots never read); padding (position -1) is
dropped. Reads gather each sequence's pages into ``[B, max_blocks * page_size, W]``,
slot ``j`` holding position ``j``, for the model's naive or absorbed attention
(``kvjax.models.mla``). With ``attention`` "pallas" (GPU) or "pallas-interpret" (CPU),
the absorbed path's one-token decode steps skip the gather and run the Pallas kernel
``pallas_kernels.mla_decode`` over the pool in place (``decode_absorbed``).
Implements ``base.LatentKVCache``.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from kvjax.cache.dense import advanced_lengths
from kvjax.cache.paged import page_slots, tables_and_lengths
from pallas_kernels.mla_decode import mla_decode_attention
from pallas_kernels.paged_decode import PAGE_SIZES

LATENT_BACKENDS = ("xla", "pallas", "pallas-interpret")


def check_latent_backend(attention: str, page_size: int, rope_key_heads: int) -> None:
    """ValueError unless ``attention`` can serve a latent pool of this layout."""
    if attention not in LATENT_BACKENDS:
        raise ValueError(f"a paged latent cache attends with one of {LATENT_BACKENDS}, "
                         f"got {attention!r}")
    if attention != "xla" and page_size not in PAGE_SIZES:
        raise ValueError(f"the MLA decode kernel needs page_size in {PAGE_SIZES}, "
                         f"got {page_size}")
    if attention != "xla" and rope_key_heads != 1:
        raise ValueError(f"the MLA decode kernel takes one RoPE key head, the model has "
                         f"{rope_key_heads}; use attention='xla'")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Fields:
      pages: [L, P, S, W] with P = num_pages, S = page_size, W = latent_width.
      block_tables: int32 [B, M], M = max_blocks; entries outside [0, P) = no page.
      lengths: int32 [B], tokens stored per sequence (positions ``[0, length)``).
      attention: static; "xla" (gather the rows, attend in the model) or "pallas" /
        "pallas-interpret" (absorbed one-token steps through the MLA decode kernel).
    """

    pages: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    attention: str = dataclasses.field(default="xla", metadata={"static": True})

    @classmethod
    def init(cls, num_layers: int, num_pages: int, page_size: int, latent_width: int,
             dtype: jnp.dtype, block_tables: jax.Array, lengths: jax.Array | None = None,
             attention: str = "xla", rope_key_heads: int = 1) -> PagedLatentCache:
        """An empty pool with the given tables (int [B, M]); ``lengths`` int [B] (default
        zeros) counts tokens already held (e.g. a shared prefix); ``attention`` one of
        ``LATENT_BACKENDS`` (checked against the page size and ``rope_key_heads``)."""
        if min(num_layers, num_pages, page_size, latent_width) <= 0:
            raise ValueError("num_layers, num_pages, page_size and latent_width must be "
                             "positive")
        check_latent_backend(attention, page_size, rope_key_heads)
        block_tables, lengths = tables_and_lengths(block_tables, lengths)
        return cls(pages=jnp.zeros((num_layers, num_pages, page_size, latent_width), dtype),
                   block_tables=block_tables, lengths=lengths, attention=attention)

    @property
    def num_pages(self) -> int:
        return int(self.pages.shape[1])

    @property
    def page_size(self) -> int:
        return int(self.pages.shape[2])

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can address: ``max_blocks * page_size``."""
        return int(self.block_tables.shape[1]) * self.page_size

    def uses_kernel(self, num_new: int) -> bool:
        """Whether a step of ``num_new`` tokens per row attends through the kernel."""
        return self.attention != "xla" and num_new == 1

    def update(self, layer: int, ckv: jax.Array, positions: jax.Array) -> PagedLatentCache:
        """Scatter this step's rows ckv [B, T, W] at positions int32 [B, T] into layer
        ``layer``'s pages (padding and missing pages dropped)."""
        b, t, w = ckv.shape
        chex.assert_shape(positions, (b, t))
        chex.assert_shape(self.block_tables, (b, None))
        chex.assert_shape(self.pages, (None, None, None, w))
        page, offset = page_slots(self.block_tables, positions, self.page_size, self.num_pages)
        return dataclasses.replace(self, pages=self.pages.at[layer, page, offset].set(
            ckv.astype(self.pages.dtype), mode="drop"))

    def decode_absorbed(self, layer: int, q_lat: jax.Array, q_rope: jax.Array,
                        positions: jax.Array, scale: float) -> jax.Array:
        """Absorbed attention of one new token per row over layer ``layer``'s pages (its
        row already written by ``update``), through the MLA decode kernel.

        q_lat [B, H, r] (``q_nope @ W_uk``), q_rope [B, H, dr], positions int32 [B, 1]
        (-1: a padding row, zeros out) -> latent output [B, H, r] in ``q_lat``'s dtype.
        """
        chex.assert_shape(positions, (q_lat.shape[0], 1))
        return mla_decode_attention(q_lat, q_rope, self.pages, self.block_tables,
                                    positions[:, 0] + 1, scale=scale, layer=layer,
                                    interpret=self.attention == "pallas-interpret")

    def update_and_read(self, layer: int, ckv: jax.Array, positions: jax.Array
                        ) -> tuple[jax.Array, jax.Array, PagedLatentCache]:
        """Scatter this step's rows into their pages; gather layer ``layer``'s pages.

        ckv [B, T, W], positions int32 [B, T] -> rows [B, M * S, W] (cache dtype), their
        positions int32 [B, M * S] (slot ``j`` = position ``j``, -1 where no page), and
        the new cache.
        """
        new = self.update(layer, ckv, positions)
        b, _, w = ckv.shape
        tables = self.block_tables
        rows = new.pages[layer][jnp.clip(tables, 0, self.num_pages - 1)].reshape(b, -1, w)
        real = jnp.repeat((tables >= 0) & (tables < self.num_pages), self.page_size, axis=1)
        slot = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
        return rows, jnp.where(real, slot, -1), new

    def advance(self, positions: jax.Array) -> PagedLatentCache:
        """lengths <- max(lengths, last written position + 1)."""
        return dataclasses.replace(self, lengths=advanced_lengths(self.lengths, positions,
                                                                  self.capacity))
