"""The Triton program of the chunked-prefill kernel (imports ``triton``: load it lazily).

One program per ``(sequence, kv_head, query tile)``, the decomposition of the Pallas
kernel in ``pallas_kernels.chunked_prefill``: the program holds ``BLOCK_Q`` new tokens
times the KV group's query heads as ``ROWS = BLOCK_Q * GROUP_ROWS`` rows (row ``r`` is
token ``r // GROUP_ROWS``, head ``r % GROUP_ROWS`` of the group, heads padded to a power
of two), so each K/V tile is read once per group and query tile. It walks the
sequence's positions from 0 up to the tile's last query position (causal skip),
``BLOCK_TOKENS`` at a time, each step one ``[BLOCK_TOKENS, HEAD_DIM]`` tile gathered
from the block table's pages, with an online softmax; row ``r`` sees positions
``<= lengths - q_lens + token``. No split-K (the query tiles give parallelism): the
program normalises and writes the float32 output itself; padding rows, missing pages
and empty chunks give zeros.

Launched by ``pallas_kernels.triton_chunked_prefill`` (``triton_launch``: arrays and
scalars in order, then the output, then the constexpr meta-parameters by name).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pallas_kernels.triton_decode_kernel import (
    MASKED,
    UPCAST_DOTS,
    attend_steps,
    tile_offsets,
)


@triton.jit
def paged_prefill_kernel(
    q_ptr: tl.tensor,  # [B, T, H, D], H = KV_HEADS * GROUP
    k_ptr: tl.tensor,  # [(L,) P, PAGE_SIZE, KV_HEADS, HEAD_DIM]
    v_ptr: tl.tensor,  # same as k_ptr
    table_ptr: tl.tensor,  # int32 [B, MAX_BLOCKS]; entries outside [0, num_pages) are missing
    meta_ptr: tl.tensor,  # int32 [B, 2]: (tokens held incl. the chunk, chunk length), clipped
    layer: tl.tensor,  # int: layer read (0 for a single-layer pool)
    num_pages: tl.tensor,  # int: P
    o_ptr: tl.tensor,  # f32 [B, T, H, D]
    T: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCALE: tl.constexpr,  # log2(e) / sqrt(HEAD_DIM): scores in log2 units, exps by exp2
    DOT_PRECISION: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    SPLIT_DIAGONAL: tl.constexpr,
) -> None:
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first_tok = tl.program_id(2) * BLOCK_Q
    rows = tl.arange(0, BLOCK_Q * GROUP_ROWS)
    dims = tl.arange(0, HEAD_DIM)

    length = tl.load(meta_ptr + seq * 2)
    q_len = tl.load(meta_ptr + seq * 2 + 1)
    g = rows % GROUP_ROWS
    t = first_tok + rows // GROUP_ROWS  # the row's token in the chunk
    in_out = (g < GROUP) & (t < T)  # rows that exist in q / o
    real = in_out & (t < q_len)  # rows with a query
    q_pos = tl.where(real, length - q_len + t, -1)  # [ROWS]
    qo_rows = (seq.to(tl.int64) * T + t) * (KV_HEADS * GROUP) + head * GROUP + g
    qo_off = qo_rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + qo_off, mask=real[:, None], other=0.0)
    if UPCAST_DOTS:
        q = q.to(tl.float32)

    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1  # < first_tok: no query here
    stop = tl.where(last_tok >= first_tok, length - q_len + last_tok + 1, 0)
    layer_off = tl.cast(layer, tl.int64) * LAYER_STRIDE

    o = tl.zeros((BLOCK_Q * GROUP_ROWS, HEAD_DIM), tl.float32)
    m = tl.full((BLOCK_Q * GROUP_ROWS,), MASKED, tl.float32)
    den = tl.zeros((BLOCK_Q * GROUP_ROWS,), tl.float32)
    off, valid = tile_offsets(table_ptr, seq, head, 0, stop, layer_off, num_pages, HEAD_DIM,
                              PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS, False)
    if SPLIT_DIAGONAL:  # steps below the tile's first query position: no causal mask
        bulk = tl.where(last_tok >= first_tok, length - q_len + first_tok + 1, 0)
        bulk = bulk // BLOCK_TOKENS * BLOCK_TOKENS
    else:
        bulk = 0
    o, m, den, off, valid = attend_steps(
        q, o, m, den, q_pos, k_ptr, v_ptr, off, valid, table_ptr, seq, head, 0, bulk, stop,
        layer_off, num_pages, HEAD_DIM, PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS, SCALE,
        DOT_PRECISION, PREFETCH_TABLE, False, False, True)
    o, m, den, off, valid = attend_steps(
        q, o, m, den, q_pos, k_ptr, v_ptr, off, valid, table_ptr, seq, head, bulk, stop, stop,
        layer_off, num_pages, HEAD_DIM, PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS, SCALE,
        DOT_PRECISION, PREFETCH_TABLE, False, True, True)

    o = tl.where(real[:, None], o / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    tl.store(o_ptr + qo_off, o, mask=in_out[:, None])
