"""Chunked prefill over a paged KV cache as a Triton kernel, launched from JAX by
``pallas_kernels.triton_launch`` (XLA's Triton custom call or jax-triton).

The contract of ``pallas_kernels.chunked_prefill.paged_prefill_attention`` (a ragged,
right-padded chunk of new tokens per sequence whose K/V are already in its pages,
attending causally to its paged history and to itself; the same argument checks),
written directly in Triton (``pallas_kernels.triton_prefill_kernel``) rather than
through Pallas's Triton lowering, which is deprecated as of JAX 0.11. As in the Triton
decode kernel, an online-softmax step is one ``[block_tokens, D]`` tile gathered from
the pages (several pages or part of one), and a layer-stacked pool is read in place.

``prefill_launch`` is a pure function from shapes and tunables to the launch; the
jax-triton call here and the Triton-interpreter tests both launch from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_prefill import check_prefill_args, chunk_meta
from pallas_kernels.triton_launch import triton_call
from pallas_kernels.triton_paged_decode import (
    MIN_BLOCK_TOKENS,
    check_launch_settings,
    dot_precision,
    rows_within,
)

LOG2E = 1.4426950408889634  # the kernel's scores are in log2 units (exp2)
QUERY_ROWS = 64  # default query tile: tokens x group heads (padded), at most this many rows
QUERY_TILE_BYTES = 16 * 1024  # ... and a [rows, head_dim] query tile of at most this size
STEP_TILE_BYTES = 16 * 1024  # default step: one K (and one V) tile of at most this size
NUM_STAGES = 2  # default pipeline depth of the K/V loads


def default_block_tokens(head_dim: int, itemsize: int) -> int:
    """Key/value tokens per step: the most (at most 64) whose ``[tokens, head_dim]`` tile
    fits ``STEP_TILE_BYTES``: 64 for 16-bit head_dim 64 or 128 (the measured default,
    ``default_block_q``)."""
    return rows_within(STEP_TILE_BYTES, 64, head_dim, itemsize)


def default_block_q(group_rows: int, head_dim: int, itemsize: int) -> int:
    """Tokens per query tile: ``QUERY_ROWS`` rows of tokens x (padded) group heads, fewer
    where a ``[rows, head_dim]`` tile would pass ``QUERY_TILE_BYTES`` (16-bit head_dim
    128: 64 rows). With 4 warps (``default_num_warps``), 64-token steps
    (``default_block_tokens``), 2 stages and the causal mask on the diagonal steps only,
    this launch was the fastest on average on every row measured on four H100s: 3.15-4.98x
    the XLA path in 29 of 30 row measurements, 2.62x in one (docs/paged-decode-kernel.md,
    2026-12-07)."""
    return max(1, rows_within(QUERY_TILE_BYTES, QUERY_ROWS, head_dim, itemsize) // group_rows)


def default_num_warps(rows: int) -> int:
    """8 warps (two warp groups) for a query tile of 128 rows or more, else 4."""
    return 8 if rows >= 128 else 4


@dataclasses.dataclass(frozen=True)
class PrefillLaunch:
    """One launch of ``paged_prefill_kernel``, everything but the arrays.

    The kernel takes (q, k_pages, v_pages, block_tables, meta, *scalars) then the output
    (float32, ``out_shape``), then ``meta`` by name.
    """

    grid: tuple[int, int, int]  # (batch, kv_heads, query tiles)
    scalars: tuple[int, int]  # (layer, num_pages)
    meta: tuple[tuple[str, int | float | str], ...]  # the tl.constexpr parameters
    num_warps: int
    num_stages: int
    out_shape: tuple[int, int, int, int]  # [B, T, H, D]


def prefill_launch(q_shape: tuple[int, ...], pool_shape: tuple[int, ...], max_blocks: int,
                   dtype: jnp.dtype, *, layer: int | None, block_q: int | None,
                   block_tokens: int | None, num_warps: int | None, num_stages: int,
                   prefetch_table: bool = True,
                   split_diagonal: bool = True) -> PrefillLaunch:
    """The launch for q ``[B, T, H, D]`` over a pool ``[P, S, K, D]`` (or ``[L, P, S, K,
    D]`` read at ``layer``) with ``max_blocks`` table columns; arguments already passed
    ``check_prefill_args``. None picks ``default_block_q`` / ``default_block_tokens`` /
    ``default_num_warps``.
    The query tile has at least 16 rows (one mma tile) and at most T's tokens.

    Raises:
      ValueError: on ``block_q`` not a power of two >= 1, and as
        ``check_launch_settings``.
    """
    batch, t, heads, head_dim = q_shape
    num_pages, page_size, kv_heads, _ = pool_shape[-4:]
    group = heads // kv_heads
    group_rows = 1 << (group - 1).bit_length()
    itemsize = jnp.dtype(dtype).itemsize
    if block_tokens is None:
        block_tokens = default_block_tokens(head_dim, itemsize)
    if block_q is None:
        block_q = default_block_q(group_rows, head_dim, itemsize)
    if not isinstance(block_q, int) or block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two >= 1, got {block_q!r}")
    block_q = min(block_q, 1 << (max(t, 1) - 1).bit_length())
    block_q = max(block_q, MIN_BLOCK_TOKENS // group_rows)  # >= 16 rows for tl.dot
    if num_warps is None:
        num_warps = default_num_warps(block_q * group_rows)
    check_launch_settings(block_tokens, num_warps, num_stages)
    meta = (("T", t), ("GROUP", group), ("GROUP_ROWS", group_rows), ("BLOCK_Q", block_q),
            ("HEAD_DIM", head_dim), ("PAGE_SIZE", page_size), ("KV_HEADS", kv_heads),
            ("LAYER_STRIDE", math.prod(pool_shape[-4:])), ("MAX_BLOCKS", max_blocks),
            ("BLOCK_TOKENS", block_tokens), ("SCALE", head_dim ** -0.5 * LOG2E),
            ("DOT_PRECISION", dot_precision(dtype)), ("PREFETCH_TABLE", bool(prefetch_table)),
            ("SPLIT_DIAGONAL", bool(split_diagonal)))
    return PrefillLaunch(grid=(batch, kv_heads, max(1, -(-t // block_q))),
                         scalars=(layer or 0, num_pages), meta=meta, num_warps=num_warps,
                         num_stages=num_stages, out_shape=(batch, t, heads, head_dim))


@functools.partial(jax.jit, static_argnames=("launch",))
def _prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
             q_lens: jax.Array, lengths: jax.Array, *, launch: PrefillLaunch) -> jax.Array:
    """The kernel through ``triton_launch.triton_call``; the float32 output cast to q's dtype
    (a separate XLA convert: storing q's dtype from the kernel measured 4-20% slower on an
    H100, docs/paged-decode-kernel.md)."""
    from pallas_kernels.triton_prefill_kernel import paged_prefill_kernel

    meta = dict(launch.meta)
    chunk = chunk_meta(q_lens, lengths, q.shape[1], int(meta["MAX_BLOCKS"]) *
                       int(meta["PAGE_SIZE"]))
    (out,) = triton_call(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), chunk, *launch.scalars,
        kernel=paged_prefill_kernel,
        out_shape=[jax.ShapeDtypeStruct(launch.out_shape, jnp.float32)],
        grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
        name="kvjax_paged_prefill", **meta)
    return out.astype(q.dtype)


def triton_paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                   block_tables: jax.Array, q_lens: jax.Array,
                                   lengths: jax.Array, *, block_q: int | None = None,
                                   block_tokens: int | None = None,
                                   num_warps: int | None = None,
                                   num_stages: int = NUM_STAGES, layer: int | None = None,
                                   prefetch_table: bool = True,
                                   split_diagonal: bool = True) -> jax.Array:
    """Causal attention of a ragged chunk of new tokens over paged K/V (Triton, GPU).

    Args:
      q: [B, T, H, D] new tokens' queries, right-padded; bf16/fp16/fp32.
      k_pages, v_pages: [P, S, K, D], already holding the chunk's K/V; same dtype as q.
      block_tables: int [B, M]; entries outside [0, P) are missing pages.
      q_lens: int [B] chunk lengths, in [0, min(T, lengths)].
      lengths: int [B] tokens per sequence including the chunk, in [0, M * S].
      block_q: tokens per query tile (a power of two); None: ``default_block_q``.
      block_tokens: key/value tokens per online-softmax step (a power of two >= 16);
        None: ``default_block_tokens``.
      num_warps, num_stages: Triton launch settings; None warps: ``default_num_warps``.
      layer: if given, ``k_pages``/``v_pages`` are a layer-stacked ``[L, P, S, K, D]``
        pool and layer ``layer`` is read in place.
      prefetch_table: read each step's block-table entries one step ahead (as
        ``triton_paged_decode_attention``).
      split_diagonal: walk the steps below each query tile's first position without the
        causal mask, and mask only the steps on the diagonal (the kernel's docstring;
        the default, measured faster); False: one causal loop.

    Returns:
      [B, T, H, D] in the dtype of ``q``; padding rows are zeros.

    Raises:
      ValueError: as ``paged_prefill_attention`` (``check_prefill_args``) and on launch
        settings ``prefill_launch`` rejects, before launching.
    """
    check_prefill_args(q, k_pages, v_pages, block_tables, q_lens, lengths, layer=layer)
    launch = prefill_launch(q.shape, k_pages.shape, block_tables.shape[1], q.dtype,
                            layer=layer, block_q=block_q, block_tokens=block_tokens,
                            num_warps=num_warps, num_stages=num_stages,
                            prefetch_table=prefetch_table,
                            split_diagonal=split_diagonal)
    return _prefill(q, k_pages, v_pages, block_tables, q_lens, lengths, launch=launch)
