"""Chunked prefill over a paged KV cache (PagedAttention) as a Pallas kernel.

Each sequence ``b`` appends a chunk of ``q_lens[b]`` new tokens (ragged, right-padded
to ``T``) whose K/V are already written to its pages, so it now holds ``lengths[b]``
tokens. New token ``t`` sits at position ``lengths[b] - q_lens[b] + t`` and attends
causally to the paged history and to the chunk up to itself; rows ``t >= q_lens[b]``
are padding and return zeros. This is ``kvjax.cache.paged.paged_attention_reference``
with ``q_pos = lengths - q_lens + t`` (or -1).

Design (same building blocks as ``pallas_kernels.paged_decode``):
  * Grid ``(batch, kv_head, query_tile)``. A program holds ``block_q`` tokens times
    the KV group's query heads as ``[block_q * group_rows, D]`` rows (row ``r`` is
    token ``r // group_rows``), so each page is read once per group and tile.
  * It sees the whole pool of its KV head and walks the block table with scalar page
    indices in a ``lax.fori_loop``, ``pages_per_block`` pages per online-softmax step,
    stopping at the page of the tile's last position (causal skip).
  * No split-K: the query tiles already give parallelism, so the kernel normalises
    and writes the final output itself. Missing pages, padding rows and empty
    sequences give zeros, never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_decode import (
    MASKED,
    Carry,
    attend_pages,
    check_paged_args,
    host_value,
    pool_spec,
    triton_compiler_params,
)

# ---------------------------------------------------------------- (1) the kernel


def _prefill_kernel(
    table_ref: jax.Ref,  # int32 [pages_padded]: this sequence's block table, -1 padded
    meta_ref: jax.Ref,  # int32 [2]: (tokens held incl. the chunk, chunk length)
    q_ref: jax.Ref,  # [block_q * group_rows, D]: one tile of tokens x query heads
    k_ref: jax.Ref,  # [P, S, D]: keys of this KV head, whole pool
    v_ref: jax.Ref,  # [P, S, D]: values of this KV head, whole pool
    o_ref: jax.Ref,  # [block_q * group_rows, D]: attention output of the tile
    *,
    group_rows: int,
    pages_per_block: int,
    scale: float,
) -> None:
    page_size = k_ref.shape[1]
    rows = q_ref.shape[0]
    block_q = rows // group_rows
    length, q_len = meta_ref[0], meta_ref[1]
    first_tok = pl.program_id(2) * block_q
    last_tok = jnp.minimum(first_tok + block_q, q_len) - 1  # < first_tok: empty tile
    num_pages_seen = jnp.where(last_tok >= first_tok,
                               pl.cdiv(length - q_len + last_tok + 1, page_size), 0)
    num_blocks = pl.cdiv(num_pages_seen, pages_per_block)
    tok = first_tok + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group_rows
    q_pos = jnp.where(tok < q_len, length - q_len + tok, -1)  # [rows, S]
    q = q_ref[...]  # [rows, D]

    def body(i: jax.Array, carry: Carry) -> Carry:
        return attend_pages(q, k_ref, v_ref, table_ref, i * pages_per_block, pages_per_block,
                            q_pos, carry, scale)

    init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, _, den = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = (o / jnp.where(den > 0, den, 1.0)[:, None]).astype(o_ref.dtype)


# ------------------------------------------------------- (2) the gridded pallas_call


def _prefill_call(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                  meta: jax.Array, *, group_rows: int, block_q: int, pages_per_block: int,
                  num_warps: int, num_stages: int, layer: int | None,
                  interpret: bool) -> jax.Array:
    """q [B, K, T_pad * group_rows, D] (token-major rows); k/v_pages [P, S, K, D] (or
    [L, P, S, K, D] read at ``layer``); tables int32 [B, pages_padded]; meta int32
    [B, 2] = (lengths, q_lens) -> like q."""
    batch, kv_heads, all_rows, head_dim = q.shape
    rows = block_q * group_rows
    kernel = functools.partial(_prefill_kernel, group_rows=group_rows,
                               pages_per_block=pages_per_block, scale=head_dim ** -0.5)
    pool = pool_spec(k_pages.shape, layer)
    tile = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, t: (b, h, t, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, all_rows // rows),
        in_specs=[
            pl.BlockSpec((None, tables.shape[1]), lambda b, h, t: (b, 0)),
            pl.BlockSpec((None, 2), lambda b, h, t: (b, 0)),
            tile,
            pool,
            pool,
        ],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        # Triton lowering chosen explicitly, as for the decode kernel (Mosaic GPU, the
        # default, does not fit the whole-pool blocks in shared memory).
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name="paged_chunked_prefill",
    )(tables, meta, q, k_pages, v_pages)


# ------------------------------------------------------------ (3) the public wrapper


def chunk_meta(q_lens: jax.Array, lengths: jax.Array, t: int, capacity: int) -> jax.Array:
    """int32 [B, 2] = (lengths clipped to [0, capacity], q_lens clipped to
    [0, min(t, lengths)]): what a kernel program reads for its sequence."""
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)
    return jnp.stack([lengths, jnp.clip(q_lens.astype(jnp.int32), 0,
                                        jnp.minimum(lengths, t))], axis=1)


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_block", "group_rows",
                                             "num_warps", "num_stages", "layer", "interpret"))
def _paged_prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                   block_tables: jax.Array, q_lens: jax.Array, lengths: jax.Array, *,
                   block_q: int, pages_per_block: int, group_rows: int, num_warps: int,
                   num_stages: int, layer: int | None, interpret: bool) -> jax.Array:
    batch, t, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[-3:-1]
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    block_q = min(block_q, pl.next_power_of_2(t))
    pages_per_block = min(pages_per_block, max_blocks)
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, -max_blocks % pages_per_block)), constant_values=-1)
    meta = chunk_meta(q_lens, lengths, t, max_blocks * page_size)
    t_pad = pl.cdiv(t, block_q) * block_q
    qg = q.reshape(batch, t, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, t_pad - t), (0, group_rows - group), (0, 0)))
    out = _prefill_call(qg.reshape(batch, kv_heads, t_pad * group_rows, head_dim), k_pages,
                        v_pages, tables, meta, group_rows=group_rows, block_q=block_q,
                        pages_per_block=pages_per_block, num_warps=num_warps,
                        num_stages=num_stages, layer=layer, interpret=interpret)
    out = out.reshape(batch, kv_heads, t_pad, group_rows, head_dim)[:, :, :t, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, t, heads, head_dim)


def check_prefill_args(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                       block_tables: jax.Array, q_lens: jax.Array, lengths: jax.Array,
                       pages_per_block: int = 1, *, layer: int | None = None) -> None:
    """Raise ValueError on bad chunked-prefill arguments (q [B, T, H, D]): those of
    ``check_paged_args`` and ``q_lens`` int [B] in ``[0, min(T, lengths)]`` (checked when
    concrete). Shared by the Pallas and Triton kernels."""
    check_paged_args(q, k_pages, v_pages, block_tables, lengths, pages_per_block, 1,
                     q_rank=4, layer=layer)
    if q_lens.ndim != 1 or q_lens.shape[0] != q.shape[0]:
        raise ValueError(f"q_lens must have shape ({q.shape[0]},), got {q_lens.shape}")
    if not jnp.issubdtype(q_lens.dtype, jnp.integer):
        raise ValueError(f"q_lens must be integer, got {q_lens.dtype}")
    q_host, len_host = host_value(q_lens), host_value(lengths)
    if q_host is not None and len_host is not None and q_host.size and (
            q_host.min() < 0 or (q_host > q.shape[1]).any() or (q_host > len_host).any()):
        raise ValueError(f"q_lens must lie in [0, min(T={q.shape[1]}, lengths)], got "
                         f"{q_host.tolist()} with lengths {len_host.tolist()}")


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, q_lens: jax.Array, lengths: jax.Array,
                            *, block_q: int = 16, pages_per_block: int = 4,
                            num_warps: int = 4, num_stages: int = 2,
                            layer: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention of a ragged chunk of new tokens over paged K/V (jitted kernel).

    Args:
      q: [B, T, H, D] new tokens' queries, right-padded; bf16/fp16/fp32.
      k_pages, v_pages: [P, S, K, D], already holding the chunk's K/V; same dtype as q.
      block_tables: int [B, M]; entries outside [0, P) are missing pages.
      q_lens: int [B] chunk lengths, in [0, min(T, lengths)].
      lengths: int [B] tokens per sequence including the chunk, in [0, M * S].
      block_q: tokens per query tile (a power of two; clamped to T's).
      pages_per_block: pages per online-softmax step.
      num_warps, num_stages: Triton launch settings (ignored when interpreting).
      layer: if given, ``k_pages``/``v_pages`` are a layer-stacked ``[L, P, S, K, D]``
        pool and layer ``layer`` is read in place.
      interpret: run the Pallas HLO interpreter (needed on CPU).

    Returns:
      [B, T, H, D] in the dtype of ``q``; padding rows are zeros.

    Raises:
      ValueError: on bad ranks, shapes, dtypes or options, before launching; on
        lengths / q_lens out of range when they are concrete.
    """
    check_prefill_args(q, k_pages, v_pages, block_tables, q_lens, lengths, pages_per_block,
                       layer=layer)
    if not isinstance(block_q, int) or block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 1, got {block_q!r}")
    rows = pl.next_power_of_2(q.shape[2] // k_pages.shape[-2])
    return _paged_prefill(q, k_pages, v_pages, block_tables, q_lens, lengths,
                          block_q=block_q, pages_per_block=pages_per_block,
                          group_rows=rows, num_warps=num_warps, num_stages=num_stages,
                          layer=layer, interpret=interpret)


# -------------------------------------------------------- (4) the pure-jnp reference


@jax.jit
def paged_prefill_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                      block_tables: jax.Array, q_lens: jax.Array,
                                      lengths: jax.Array) -> jax.Array:
    """Gather every sequence's pages and run a causal masked float32 softmax."""
    batch, t, heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    span = block_tables.shape[1] * page_size
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    k = k_pages[pages].reshape(batch, span, kv_heads, head_dim).astype(jnp.float32)
    v = v_pages[pages].reshape(batch, span, kv_heads, head_dim).astype(jnp.float32)
    real = jnp.repeat((block_tables >= 0) & (block_tables < num_pages), page_size, axis=1)
    tok = jnp.arange(t)[None, :]
    q_pos = jnp.where(tok < q_lens[:, None], (lengths - q_lens)[:, None] + tok, -1)  # [B, T]
    mask = real[:, None, :] & (jnp.arange(span)[None, None, :] <= q_pos[:, :, None])
    qg = q.reshape(batch, t, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=hi) * head_dim ** -0.5
    mask = mask[:, None, None]  # [B, 1, 1, T, span]
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    w = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    denom = w.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", w / jnp.where(denom > 0, denom, 1.0), v,
                     precision=hi)
    return out.reshape(batch, t, heads, head_dim).astype(q.dtype)
