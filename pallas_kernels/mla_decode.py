"""Absorbed MLA decode over a paged latent pool, as a Pallas kernel with split-K.

Multi-head latent attention (DeepSeek-V2, 2024) caches one row per token: the
compressed latent ``c`` (width ``r = kv_lora_rank``) followed by the decoupled RoPE key
(width ``dr``), pages ``[P, S, r + dr]`` (``kvjax.cache.paged_latent``). On the
absorbed path the key up-projection is folded into the query, ``q_lat = q_nope W_uk``
(``[H, r]``), so every query head scores the cached rows directly,

    score[h, t] = (q_lat[h] . c[t] + q_rope[h] . k_rope[t]) * scale,

and attends over the latent itself as the value, ``out_lat[h] = softmax(score[h]) c``
(``[H, r]``; the caller applies ``W_uv``). All heads share the single latent "KV head",
so the kernel is MQA-shaped: one program per (sequence, split, head block) takes
``heads_per_block`` query heads (rows padded to a power of two, >= 16 off the
interpreter) and computes the two dot products on static column slices of the page (no
concatenation). Head blocks are the grid's last axis, so the programs that read the same
pages are launched together and share them through L2; one block of every head reads
each page once. Blocking exists because the float32 accumulator of all heads at once
(128 heads x 512 x 4 B = 256 KiB at DeepSeek-V2's shape) is an SM's whole register
file: the first H100 run with one block per sequence spilled and ran at 0.3x XLA.
Split partials ``(o, m, den)`` are merged by ``paged_decode.combine_splits``; masking,
lengths, missing pages and the split rule follow ``paged_decode`` (zeros for empty
sequences, never NaN). Only one RoPE key head (DeepSeek-V2/V3's layout) is supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_decode import (
    MASKED,
    auto_num_splits,
    check_table_args,
    combine_splits,
    split_tables,
    triton_compiler_params,
)

Carry = tuple[jax.Array, jax.Array, jax.Array]  # o [rows, r], m [rows], den [rows], f32


def _mla_kernel(table_ref: jax.Ref, length_ref: jax.Ref, q_lat_ref: jax.Ref,
                q_rope_ref: jax.Ref, pages_ref: jax.Ref, o_ref: jax.Ref, m_ref: jax.Ref,
                den_ref: jax.Ref, *, rank: int, pages_per_split: int, pages_per_block: int,
                scale: float) -> None:
    """table [M'] int32, length [1], q_lat [rows, r], q_rope [rows, dr], pages [P, S, W]
    -> o f32 [rows, r], m and den f32 [rows] of this (sequence, split)."""
    num_pages, page_size, _ = pages_ref.shape
    length = length_ref[0]
    first = pl.program_id(1) * pages_per_split  # grid (sequence, split, head block)
    stop = jnp.minimum(first + pages_per_split, pl.cdiv(length, page_size))
    num_blocks = pl.cdiv(jnp.maximum(stop - first, 0), pages_per_block)
    q_lat, q_rope = q_lat_ref[...], q_rope_ref[...]
    slot = lax.broadcasted_iota(jnp.int32, (q_lat.shape[0], page_size), 1)
    dims = (((1,), (1,)), ((), ()))

    def body(i: jax.Array, carry: Carry) -> Carry:
        o, m, den = carry
        start = first + i * pages_per_block
        scores, masks, values = [], [], []
        for j in range(pages_per_block):  # static
            entry = table_ref[start + j]
            real = (entry >= 0) & (entry < num_pages)
            page = jnp.clip(entry, 0, num_pages - 1)
            c = pages_ref[page, :, :rank]  # [S, r]
            s = (lax.dot_general(q_lat, c, dims, preferred_element_type=jnp.float32)
                 + lax.dot_general(q_rope, pages_ref[page, :, rank:], dims,
                                   preferred_element_type=jnp.float32)) * scale
            mask = real & ((start + j) * page_size + slot < length)  # [rows, S]
            scores.append(jnp.where(mask, s, MASKED))
            masks.append(mask)
            values.append(c)
        m_new = m
        for s in scores:
            m_new = jnp.maximum(m_new, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        o, den = o * alpha[:, None], den * alpha
        for s, mask, c in zip(scores, masks, values, strict=True):
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            den = den + p.sum(axis=1)
            o = o + lax.dot_general(p.astype(c.dtype), c, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        return o, m_new, den

    init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full(m_ref.shape, MASKED, jnp.float32),
            jnp.zeros(den_ref.shape, jnp.float32))
    o, m, den = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = o
    m_ref[...] = m
    den_ref[...] = den


def check_mla_args(q_lat: jax.Array, q_rope: jax.Array, pages: jax.Array,
                   block_tables: jax.Array, lengths: jax.Array, pages_per_block: int,
                   num_splits: int, layer: int | None) -> None:
    """Raise ValueError on bad absorbed-MLA decode arguments (before anything runs)."""
    pool_rank = 3 if layer is None else 4
    for name, x, rank in (("q_lat", q_lat, 3), ("q_rope", q_rope, 3), ("pages", pages, pool_rank),
                          ("block_tables", block_tables, 2), ("lengths", lengths, 1)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")
    if layer is not None and not (isinstance(layer, int) and 0 <= layer < pages.shape[0]):
        raise ValueError(f"layer must be an int in [0, {pages.shape[0]}), got {layer!r}")
    batch, heads, rank = q_lat.shape
    num_pages, page_size, width = pages.shape[-3:]
    if q_rope.shape[:2] != (batch, heads):
        raise ValueError(f"q_rope {q_rope.shape} must match q_lat {q_lat.shape} in [B, H]")
    if rank + q_rope.shape[2] != width:
        raise ValueError(f"latent rows are {width} wide, but q_lat ({rank}) + q_rope "
                         f"({q_rope.shape[2]}) make {rank + q_rope.shape[2]}; only one "
                         "RoPE key head is supported")
    if not q_lat.dtype == q_rope.dtype == pages.dtype:
        raise ValueError(f"q_lat, q_rope and pages must share a dtype, got {q_lat.dtype}, "
                         f"{q_rope.dtype}, {pages.dtype}")
    if heads < 1:
        raise ValueError(f"need at least one query head, got q_lat {q_lat.shape}")
    check_table_args(q_lat.dtype, batch, num_pages, page_size, block_tables, lengths,
                     pages_per_block, num_splits)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "num_splits",
                                             "heads_per_block", "num_warps", "num_stages",
                                             "layer", "interpret"))
def _mla_decode(q_lat: jax.Array, q_rope: jax.Array, pages: jax.Array,
                block_tables: jax.Array, lengths: jax.Array, *, scale: float,
                pages_per_block: int, num_splits: int, heads_per_block: int, num_warps: int,
                num_stages: int, layer: int | None, interpret: bool) -> jax.Array:
    batch, heads, rank = q_lat.shape
    num_pages, page_size, width = pages.shape[-3:]
    tables, lengths, pages_per_split, pages_per_block = split_tables(
        block_tables, lengths, page_size, num_splits, pages_per_block)
    block = min(heads_per_block, heads)
    rows = block if interpret else max(16, pl.next_power_of_2(block))
    head_blocks = pl.cdiv(heads, block)
    # head block j holds heads [j * block, (j + 1) * block) in its first `block` rows
    q_lat, q_rope = (jnp.pad(x, ((0, 0), (0, head_blocks * block - heads), (0, 0)))
                     .reshape(batch, head_blocks, block, -1) for x in (q_lat, q_rope))
    pad = ((0, 0), (0, 0), (0, rows - block), (0, 0))
    q_lat, q_rope = (jnp.pad(x, pad).reshape(batch, head_blocks * rows, -1)
                     for x in (q_lat, q_rope))
    kernel = functools.partial(_mla_kernel, rank=rank, pages_per_split=pages_per_split,
                               pages_per_block=pages_per_block, scale=scale)
    if layer is None:
        pool = pl.BlockSpec((num_pages, page_size, width), lambda b, s, h: (0, 0, 0))
    else:
        pool = pl.BlockSpec((None, num_pages, page_size, width),
                            lambda b, s, h: (layer, 0, 0, 0))
    stat = (batch, num_splits, head_blocks * rows)
    o, m, den = pl.pallas_call(
        kernel,
        grid=(batch, num_splits, head_blocks),
        in_specs=[pl.BlockSpec((None, tables.shape[1]), lambda b, s, h: (b, 0)),
                  pl.BlockSpec((None, 1), lambda b, s, h: (b, 0)),
                  pl.BlockSpec((None, rows, rank), lambda b, s, h: (b, h, 0)),
                  pl.BlockSpec((None, rows, width - rank), lambda b, s, h: (b, h, 0)),
                  pool],
        out_specs=[pl.BlockSpec((None, None, rows, rank), lambda b, s, h: (b, s, h, 0)),
                   pl.BlockSpec((None, None, rows), lambda b, s, h: (b, s, h)),
                   pl.BlockSpec((None, None, rows), lambda b, s, h: (b, s, h))],
        out_shape=[jax.ShapeDtypeStruct((*stat, rank), jnp.float32),
                   jax.ShapeDtypeStruct(stat, jnp.float32),
                   jax.ShapeDtypeStruct(stat, jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name="mla_absorbed_decode",
    )(tables, lengths, q_lat, q_rope, pages)
    # each head block as a "KV head" of `block` real rows for the shared combine
    o = o.reshape(batch, num_splits, head_blocks, rows, rank).transpose(0, 2, 1, 3, 4)
    m, den = (x.reshape(batch, num_splits, head_blocks, rows).transpose(0, 2, 1, 3)
              for x in (m, den))
    return combine_splits(o, m, den, block, q_lat.dtype)[:, :heads]


def mla_decode_attention(q_lat: jax.Array, q_rope: jax.Array, pages: jax.Array,
                         block_tables: jax.Array, lengths: jax.Array, *, scale: float,
                         pages_per_block: int = 4, num_splits: int | None = None,
                         heads_per_block: int = 16, num_warps: int = 4, num_stages: int = 2, layer: int | None = None,
                         interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode attention of one new token per sequence over latent pages.

    Args:
      q_lat: [B, H, r] queries folded into the latent space (``q_nope @ W_uk``).
      q_rope: [B, H, dr] RoPE part of the queries; same dtype (bf16/fp16/fp32).
      pages: [P, S, r + dr] latent rows ``[c | k_rope]`` of one layer, or a
        layer-stacked ``[L, P, S, r + dr]`` pool read in place at ``layer``.
      block_tables: int [B, M]; entries outside [0, P) are missing pages (not attended).
      lengths: int [B] tokens per sequence in [0, M * S]; length 0 gives a zero row.
      scale: softmax scale (MLA: ``(dn + dr) ** -0.5``).
      pages_per_block: pages per online-softmax step (clamped to the split).
      num_splits: split-K factor over the table columns; None: about 256 programs
        (``auto_num_splits`` counting head blocks as KV heads), at most 8.
      heads_per_block: query heads per program (the last one may be partial).
      num_warps, num_stages: Triton launch settings (ignored when interpreting).
      interpret: run the Pallas HLO interpreter (needed on CPU).

    Returns:
      [B, H, r] attention output in the latent space, in ``q_lat``'s dtype.

    Raises:
      ValueError: on shapes, dtypes, page size, widths or settings that do not fit,
        before anything runs.
    """
    check_mla_args(q_lat, q_rope, pages, block_tables, lengths, pages_per_block,
                   1 if num_splits is None else num_splits, layer)
    if isinstance(heads_per_block, bool) or not isinstance(heads_per_block, int) or (
            heads_per_block < 1):
        raise ValueError(f"heads_per_block must be a positive int, got {heads_per_block!r}")
    if num_splits is None:
        head_blocks = -(-q_lat.shape[1] // heads_per_block)
        num_splits = auto_num_splits(q_lat.shape[0], head_blocks, block_tables.shape[1])
    return _mla_decode(q_lat, q_rope, pages, block_tables, lengths, scale=float(scale),
                       pages_per_block=pages_per_block, num_splits=num_splits,
                       heads_per_block=heads_per_block,
                       num_warps=num_warps, num_stages=num_stages, layer=layer,
                       interpret=interpret)


def mla_decode_reference(q_lat: jax.Array, q_rope: jax.Array, pages: jax.Array,
                         block_tables: jax.Array, lengths: jax.Array, *,
                         scale: float) -> jax.Array:
    """Pure-jnp absorbed MLA decode over one layer's pages ``[P, S, r + dr]`` (gather,
    mask, softmax in float32): the kernel's reference. Same arguments and result."""
    num_pages, page_size, _ = pages.shape
    rank = q_lat.shape[-1]
    tables = block_tables.astype(jnp.int32)
    real = (tables >= 0) & (tables < num_pages)  # [B, M]
    rows = pages[jnp.clip(tables, 0, num_pages - 1)]  # [B, M, S, W]
    rows = rows.reshape(rows.shape[0], -1, rows.shape[-1]).astype(jnp.float32)
    pos = jnp.arange(rows.shape[1])
    visible = jnp.repeat(real, page_size, axis=1) & (pos[None] < lengths[:, None])  # [B, T]
    s = (jnp.einsum("bhr,btr->bht", q_lat.astype(jnp.float32), rows[..., :rank])
         + jnp.einsum("bhd,btd->bht", q_rope.astype(jnp.float32), rows[..., rank:])) * scale
    s = jnp.where(visible[:, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible[:, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = p.sum(-1, keepdims=True)
    out = jnp.einsum("bht,btr->bhr", p, rows[..., :rank]) / jnp.where(den > 0, den, 1.0)
    return out.astype(q_lat.dtype)
