"""Paged cache (PagedAttention, Kwon et al., 2023): a shared pool of fixed-size pages.

Device memory is one pool of ``num_pages`` pages of ``page_size`` token slots per
layer, ``[L, num_pages, page_size, K, D]`` (token-major pages). Each sequence owns a
block table, int32 ``[max_blocks]``, mapping its logical block ``i`` (tokens
``[i * page_size, (i + 1) * page_size)``) to a physical page; the host-side
``kvjax.memory.allocator.BlockAllocator`` decides the tables. The token at position
``p`` of sequence ``b`` lives in page ``block_tables[b, p // page_size]`` at offset
``p % page_size``.

Block-table entries outside ``[0, num_pages)`` (e.g. a ``-1`` pad) mean "no page":
writes to them are dropped and their slots are never attended to. Writes are a
scatter into fixed-shape buffers, so a jitted step compiles once for a given pool and
table width. Several sequences may share a page (a forked prefix); a shared page
must not be written, so the host applies copy-on-write copies with ``copy_pages``
and swaps tables with ``with_block_tables`` before the step that writes.

Attention goes through ``paged_attention_reference``, an XLA gather of each
sequence's pages into a contiguous ``[B, max_blocks * page_size, K, D]`` view; it is
the single place a Pallas kernel is meant to replace.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kvjax.attention import attend_by_position
from kvjax.cache.dense import advanced_lengths
from pallas_kernels.chunked_prefill import paged_prefill_attention
from pallas_kernels.paged_decode import HEAD_DIMS as KERNEL_HEAD_DIMS
from pallas_kernels.paged_decode import PAGE_SIZES as KERNEL_PAGE_SIZES
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.triton_chunked_prefill import triton_paged_prefill_attention
from pallas_kernels.triton_paged_decode import (
    triton_paged_decode_append,
    triton_unavailable_reason,
)

ATTENTION_BACKENDS = ("xla", "pallas", "pallas-interpret", "triton")


def _valid_pages(block_tables: jax.Array, num_pages: int) -> jax.Array:
    """bool, same shape: which table entries name a real page."""
    return (block_tables >= 0) & (block_tables < num_pages)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Attention over paged K/V by gathering each sequence's pages (XLA reference).

    Slot ``j`` of the gathered sequence holds position ``j``; a query at position
    ``p`` attends to slots ``j <= p`` whose table entry names a real page. Slots past
    the sequence's length are excluded by the same causal rule, so unwritten slots
    and padded table entries beyond the length are never read.

    Args:
      q: [B, T, H, D] queries.
      k_pages, v_pages: [num_pages, page_size, K, D], one layer of the pool.
      block_tables: int32 [B, max_blocks], physical page of each logical block.
      q_pos: int32 [B, T], query positions; -1 for padding (output row is zeros).

    Returns:
      [B, T, H, D] in the dtype of ``v_pages``.
    """
    chex.assert_rank([q, k_pages, v_pages, block_tables, q_pos], [4, 4, 4, 2, 2])
    chex.assert_equal_shape([k_pages, v_pages])
    chex.assert_type([block_tables, q_pos], int)
    b, t = q.shape[:2]
    chex.assert_shape(q_pos, (b, t))
    chex.assert_shape(block_tables, (b, None))
    num_pages, page_size, kv_heads, head_dim = k_pages.shape
    max_blocks = block_tables.shape[1]
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    span = max_blocks * page_size
    k = k_pages[pages].reshape(b, span, kv_heads, head_dim)
    v = v_pages[pages].reshape(b, span, kv_heads, v_pages.shape[-1])
    slot = jnp.arange(span, dtype=jnp.int32)[None, :]
    real = jnp.repeat(_valid_pages(block_tables, num_pages), page_size, axis=1)
    k_pos = jnp.where(real, slot, -1)
    return attend_by_position(q, k, v, q_pos, k_pos)


def page_slots(block_tables: jax.Array, positions: jax.Array, page_size: int,
               num_pages: int) -> tuple[jax.Array, jax.Array]:
    """Physical page and in-page offset of each position, int32 [B, T] each.

    Padding, positions past the table and "no page" entries get page ``num_pages``, out
    of bounds (not -1, which would wrap), so a ``mode="drop"`` scatter discards them.
    """
    block = positions // page_size
    ok = (positions >= 0) & (block < block_tables.shape[1])
    entry = jnp.take_along_axis(block_tables, jnp.where(ok, block, 0), axis=1)
    ok &= _valid_pages(entry, num_pages)
    return jnp.where(ok, entry, num_pages), positions % page_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """Fields:
      k_pages, v_pages: [L, P, S, K, D] with P = num_pages, S = page_size.
      block_tables: int32 [B, M], M = max_blocks; entries outside [0, P) = no page.
      lengths: int32 [B], tokens stored per sequence (positions ``[0, length)``).
      attention: static; how steps attend: "xla" (``paged_attention_reference``),
        "pallas" (the Pallas decode kernel for one new token per sequence, the Pallas
        chunked-prefill kernel for several; GPU), "pallas-interpret" (the same kernels
        in the Pallas interpreter, CPU) or "triton" (the Triton decode and chunked-prefill
        kernels, GPU, ``pallas_kernels.triton_launch``; no Pallas). The
        kernels read this step's layer of the pool in place and expect each row's
        valid positions (>= 0) to be one run from the row's start (right padding).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    attention: str = dataclasses.field(default="xla", metadata={"static": True})

    @classmethod
    def init(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
             head_dim: int, dtype: jnp.dtype, block_tables: jax.Array,
             lengths: jax.Array | None = None, attention: str = "xla") -> PagedCache:
        """An empty page pool with the given tables.

        ``block_tables`` int [B, M]; ``lengths`` int [B] (default zeros) records how
        many tokens each sequence already holds (e.g. a shared prefix already written).
        """
        if min(num_layers, num_pages, page_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("num_layers, num_pages, page_size, num_kv_heads and head_dim "
                             "must be positive")
        check_attention_backend(attention, page_size, head_dim)
        block_tables, lengths = tables_and_lengths(block_tables, lengths)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype),
                   block_tables=block_tables, lengths=lengths, attention=attention)

    @property
    def num_pages(self) -> int:
        return int(self.k_pages.shape[1])

    @property
    def page_size(self) -> int:
        return int(self.k_pages.shape[2])

    @property
    def max_blocks(self) -> int:
        return int(self.block_tables.shape[1])

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can address: ``max_blocks * page_size``."""
        return self.max_blocks * self.page_size

    def update_and_attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                          positions: jax.Array) -> tuple[jax.Array, PagedCache]:
        """Scatter this step's K/V into their pages, then attend over positions ``<= q``.
        Under ``"triton"`` a decode step (T = 1) does both in the decode kernel's one
        launch (``triton_paged_decode_append``; no scatter).

        q [B, T, H, D], k/v [B, T, K, D], positions int32 [B, T] -> [B, T, H, D].
        """
        chex.assert_rank([q, k, v, positions], [4, 4, 4, 2])
        chex.assert_equal_shape([k, v])
        chex.assert_equal_shape_prefix([q, k, positions], 2)
        chex.assert_shape(positions, (self.block_tables.shape[0], None))
        if self.attention == "triton" and q.shape[1] == 1:  # decode: write + attend, 1 launch
            out, new_k, new_v = triton_paged_decode_append(
                q[:, 0], k[:, 0].astype(self.k_pages.dtype), v[:, 0].astype(self.v_pages.dtype),
                self.k_pages, self.v_pages, self.block_tables, positions[:, 0] + 1,
                layer=layer)
            return out[:, None], dataclasses.replace(self, k_pages=new_k, v_pages=new_v)
        page, offset = page_slots(self.block_tables, positions, self.page_size, self.num_pages)
        new_k = self.k_pages.at[layer, page, offset].set(k.astype(self.k_pages.dtype),
                                                         mode="drop")
        new_v = self.v_pages.at[layer, page, offset].set(v.astype(self.v_pages.dtype),
                                                         mode="drop")
        new = dataclasses.replace(self, k_pages=new_k, v_pages=new_v)
        return new._attend(layer, q, positions), new

    def _attend(self, layer: int, q: jax.Array, positions: jax.Array) -> jax.Array:
        """q [B, T, H, D] at positions int32 [B, T] over the (written) pool, by backend."""
        tables, k_pages, v_pages = self.block_tables, self.k_pages, self.v_pages
        decode = q.shape[1] == 1
        if self.attention == "xla":
            return paged_attention_reference(q, k_pages[layer], v_pages[layer], tables,
                                             positions)
        interpret = self.attention == "pallas-interpret"
        if not decode:  # a chunk of new tokens per row: valid positions [p0, p0 + q_len)
            q_lens, ends = (positions >= 0).sum(axis=1), positions.max(axis=1) + 1
            if self.attention == "triton":
                return triton_paged_prefill_attention(q, k_pages, v_pages, tables, q_lens,
                                                      ends, layer=layer)
            return paged_prefill_attention(q, k_pages, v_pages, tables, q_lens, ends,
                                           layer=layer, interpret=interpret)
        lengths = positions[:, 0] + 1  # padding rows (-1): length 0, zero output
        return paged_decode_attention(q[:, 0], k_pages, v_pages, tables, lengths, layer=layer,
                                      interpret=interpret)[:, None]

    def advance(self, positions: jax.Array) -> PagedCache:
        """lengths <- max(lengths, last written position + 1)."""
        return dataclasses.replace(self, lengths=advanced_lengths(self.lengths, positions,
                                                                  self.capacity))


def tables_and_lengths(block_tables: ArrayLike, lengths: ArrayLike | None
                       ) -> tuple[jax.Array, jax.Array]:
    """A pool's block tables int32 [B, M] and lengths int32 [B] (default zeros), checked."""
    tables = jnp.asarray(block_tables, jnp.int32)
    chex.assert_rank(tables, 2)
    batch = tables.shape[0]
    lens = (jnp.zeros((batch,), jnp.int32) if lengths is None
            else jnp.asarray(lengths, jnp.int32))
    chex.assert_shape(lens, (batch,))
    return tables, lens


def check_attention_backend(attention: str, page_size: int, head_dim: int) -> None:
    """ValueError unless ``attention`` is a backend that can serve this page layout."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention != "xla" and (page_size not in KERNEL_PAGE_SIZES
                               or head_dim not in KERNEL_HEAD_DIMS):
        raise ValueError(f"the decode kernels need page_size in {KERNEL_PAGE_SIZES} and "
                         f"head_dim in {KERNEL_HEAD_DIMS}; got {page_size} and {head_dim}")
    if attention == "triton" and (reason := triton_unavailable_reason()) is not None:
        raise ValueError(f"attention 'triton' cannot run here: {reason}; use 'pallas' "
                         "(GPU), 'pallas-interpret' or 'xla'")


def copy_pages(cache: PagedCache, src: jax.Array, dst: jax.Array) -> PagedCache:
    """Copy-on-write on device: page ``dst[i]`` <- page ``src[i]`` in every layer, K and V.

    ``src``, ``dst``: int [n] page ids in ``[0, num_pages)``; ``dst`` entries must be
    distinct. All sources are read from the pool as it was before the call. Other
    pages, the tables and the lengths are unchanged.
    """
    src = jnp.asarray(src, jnp.int32)
    dst = jnp.asarray(dst, jnp.int32)
    chex.assert_rank([src, dst], 1)
    chex.assert_equal_shape([src, dst])
    return dataclasses.replace(cache,
                               k_pages=cache.k_pages.at[:, dst].set(cache.k_pages[:, src]),
                               v_pages=cache.v_pages.at[:, dst].set(cache.v_pages[:, src]))


def with_block_tables(cache: PagedCache, block_tables: jax.Array,
                      lengths: jax.Array | None = None) -> PagedCache:
    """The same page pool seen through new tables int [B', M'] (and lengths int [B']).

    Without ``lengths`` the batch must not change and the old lengths are kept.
    """
    block_tables = jnp.asarray(block_tables, jnp.int32)
    chex.assert_rank(block_tables, 2)
    if lengths is None:
        chex.assert_shape(block_tables, (cache.block_tables.shape[0], None))
        lengths = cache.lengths
    lengths = jnp.asarray(lengths, jnp.int32)
    chex.assert_shape(lengths, (block_tables.shape[0],))
    return dataclasses.replace(cache, block_tables=block_tables, lengths=lengths)
