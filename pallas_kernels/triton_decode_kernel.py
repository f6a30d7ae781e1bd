"""The Triton program of the paged decode kernel (imports ``triton``: load it lazily).

One program per ``(sequence, kv_head, split)``, the same decomposition as the Pallas
kernel in ``pallas_kernels.paged_decode``: the program holds the KV group's query heads
as ``ROWS`` rows (zero-padded to a power of two >= 16, one mma tile), walks its split's
share of the sequence's positions (the row's steps up to its length, shared evenly by
the ``NUM_SPLITS`` splits: the table's width sets no work), ``BLOCK_TOKENS`` tokens per
online-softmax step (one ``[BLOCK_TOKENS, HEAD_DIM]`` tile gathered from their pages:
several pages, or part of one; ``attend_steps``), and writes its unnormalised
partial ``(o, m, den)`` for ``pallas_kernels.paged_decode.combine_splits`` — or, with one
split, the normalised output itself in the output's dtype (no combine launched).
``paged_decode_append_kernel`` is the same program that first appends the step's token:
the program whose split holds position ``length - 1`` stores its K/V row in the page
and folds it in from registers (the pools are aliased outputs). Pages are token-major
``[P, S, K, D]``; ``HEAD_MAJOR`` reads ``[P, K, S, D]`` pages (``row_offset``).

Launched by ``pallas_kernels.triton_paged_decode`` (``triton_launch``: jax-triton's
calling convention, whichever launcher): array and scalar arguments in order, then the
outputs, then the ``tl.constexpr`` meta-parameters by name. All arrays are dense
row-major, so the strides follow from the constexpr shapes; the scalar ``layer`` times
the constexpr ``LAYER_STRIDE`` selects the layer of a layer-stacked pool without copying
it (a constexpr stride keeps the K/V addresses provably aligned, so loads are
vectorised).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pallas_kernels.paged_decode import MASKED as _MASKED_VALUE

MASKED = tl.constexpr(_MASKED_VALUE)
# Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers, so under
# the interpreter (CPU tests) 16-bit dot operands are upcast to float32 first.
UPCAST_DOTS = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def paged_decode_kernel(
    q_ptr: tl.tensor,  # [B, H, D], H = KV_HEADS * GROUP
    k_ptr: tl.tensor,  # [(L,) P, PAGE_SIZE, KV_HEADS, HEAD_DIM]
    v_ptr: tl.tensor,  # same as k_ptr
    table_ptr: tl.tensor,  # int32 [B, MAX_BLOCKS]; entries outside [0, num_pages) are missing pages
    length_ptr: tl.tensor,  # int32 [B]
    layer: tl.tensor,  # int: layer read (0 for a single-layer pool)
    num_pages: tl.tensor,  # int: P
    o_ptr: tl.tensor,  # f32 [B, KV_HEADS, NUM_SPLITS, GROUP, HEAD_DIM]; NUM_SPLITS 1: [B, H, D], q's dtype
    m_ptr: tl.tensor,  # f32 [B, KV_HEADS, NUM_SPLITS, GROUP]
    den_ptr: tl.tensor,  # f32 [B, KV_HEADS, NUM_SPLITS, GROUP]
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,  # elements per layer: P * PAGE_SIZE * KV_HEADS * HEAD_DIM
    MAX_BLOCKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,  # pages [P, KV_HEADS, PAGE_SIZE, HEAD_DIM] instead of [P, S, K, D]
) -> None:
    """Attend positions ``[0, length)`` of each sequence's pages."""
    decode_program(q_ptr, k_ptr, v_ptr, q_ptr, q_ptr, table_ptr, length_ptr, layer, num_pages,
                   o_ptr, m_ptr, den_ptr, GROUP, ROWS, HEAD_DIM, PAGE_SIZE, KV_HEADS,
                   LAYER_STRIDE, MAX_BLOCKS, NUM_SPLITS, BLOCK_TOKENS, SCALE,
                   DOT_PRECISION, PREFETCH_TABLE, HEAD_MAJOR, False, KV_HEADS * GROUP)


@triton.jit
def paged_decode_append_kernel(
    qkv_ptr: tl.tensor,  # [B, H + 2 * KV_HEADS, D], pool dtype: q heads, then the new K, V
    k_ptr: tl.tensor,  # [(L,) P, PAGE_SIZE, KV_HEADS, HEAD_DIM], written at the new token
    v_ptr: tl.tensor,  # same as k_ptr
    table_ptr: tl.tensor,  # int32 [B, MAX_BLOCKS]
    length_ptr: tl.tensor,  # int32 [B]: the new token sits at position length - 1
    layer: tl.tensor,
    num_pages: tl.tensor,
    o_ptr: tl.tensor,  # as paged_decode_kernel
    m_ptr: tl.tensor,
    den_ptr: tl.tensor,
    k_out_ptr: tl.tensor,  # the same buffer as k_ptr (aliased output; written through k_ptr)
    v_out_ptr: tl.tensor,  # the same buffer as v_ptr
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
) -> None:
    """Write each sequence's new token (K/V at position ``length - 1``) into its page and
    attend positions ``[0, length)``: the scatter of the step's K/V and the decode
    attention in one launch. The program whose split holds the new token writes it and
    takes it from registers; no program reads its slot from the pool. The query and the
    new K/V come packed in one array (one producer fusion in the model's step)."""
    heads = KV_HEADS * GROUP
    decode_program(qkv_ptr, k_ptr, v_ptr, qkv_ptr + heads * HEAD_DIM,
                   qkv_ptr + (heads + KV_HEADS) * HEAD_DIM, table_ptr, length_ptr, layer,
                   num_pages, o_ptr, m_ptr, den_ptr, GROUP, ROWS, HEAD_DIM, PAGE_SIZE,
                   KV_HEADS, LAYER_STRIDE, MAX_BLOCKS, NUM_SPLITS,
                   BLOCK_TOKENS, SCALE, DOT_PRECISION, PREFETCH_TABLE, HEAD_MAJOR, True,
                   heads + 2 * KV_HEADS)


@triton.jit
def decode_program(
    q_ptr: tl.tensor,  # sequence b's query heads at rows [b * Q_ROWS, b * Q_ROWS + H)
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    k_new_ptr: tl.tensor,  # read only when APPEND: sequence b's KV head h at b * Q_ROWS + h
    v_new_ptr: tl.tensor,
    table_ptr: tl.tensor,
    length_ptr: tl.tensor,
    layer: tl.tensor,
    num_pages: tl.tensor,
    o_ptr: tl.tensor,
    m_ptr: tl.tensor,
    den_ptr: tl.tensor,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    LAYER_STRIDE: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    APPEND: tl.constexpr,
    Q_ROWS: tl.constexpr,  # HEAD_DIM rows per sequence in the q (and new K/V) array
) -> None:
    """The body of both decode kernels: program ``(sequence, kv_head, split)``."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    real_row = rows < GROUP

    q_rows = seq.to(tl.int64) * Q_ROWS + head * GROUP + rows  # [ROWS]
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=real_row[:, None],
                other=0.0)
    if UPCAST_DOTS:
        q = q.to(tl.float32)

    given = tl.load(length_ptr + seq)
    length = tl.minimum(tl.maximum(given, 0), MAX_BLOCKS * PAGE_SIZE)
    # The row's own steps shared evenly by the splits, whatever the table's width: this
    # split's tokens are [first, stop), a whole number of steps (the last one may be short).
    split_tokens = tl.cdiv(tl.cdiv(length, BLOCK_TOKENS), NUM_SPLITS) * BLOCK_TOKENS
    first = split * split_tokens
    stop = tl.minimum(first + split_tokens, length)
    new = given - 1  # the appended token's position (APPEND): not read from the pool
    if APPEND:  # noqa: SIM108 (a constexpr branch of a Triton program)
        stop_read = tl.minimum(stop, tl.maximum(new, first))
    else:
        stop_read = stop
    # layer may arrive as a constexpr (launchers specialise integer arguments equal to 1)
    layer_off = tl.cast(layer, tl.int64) * LAYER_STRIDE  # constexpr stride: aligned loads

    o = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    m = tl.full((ROWS,), MASKED, tl.float32)
    den = tl.zeros((ROWS,), tl.float32)
    off, valid = tile_offsets(table_ptr, seq, head, first, stop_read, layer_off, num_pages,
                              HEAD_DIM, PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS,
                              HEAD_MAJOR)
    o, m, den, off, valid = attend_steps(  # q_pos (m) unread: no causal mask in decode
        q, o, m, den, m, k_ptr, v_ptr, off, valid, table_ptr, seq, head, first, stop_read,
        stop_read, layer_off, num_pages, HEAD_DIM, PAGE_SIZE, KV_HEADS, MAX_BLOCKS,
        BLOCK_TOKENS, SCALE, DOT_PRECISION, PREFETCH_TABLE, HEAD_MAJOR, False, False)
    if APPEND:
        o, m, den = append_token(q, o, m, den, k_ptr, v_ptr, k_new_ptr, v_new_ptr, table_ptr,
                                 seq, head, new, first, stop, layer_off, num_pages, HEAD_DIM,
                                 PAGE_SIZE, KV_HEADS, MAX_BLOCKS, SCALE, Q_ROWS, HEAD_MAJOR)

    out_rows = ((seq.to(tl.int64) * KV_HEADS + head) * NUM_SPLITS + split) * GROUP + rows
    if NUM_SPLITS == 1:  # the whole sequence: the normalised output, in o_ptr's dtype
        o = o / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(o_ptr + out_rows[:, None] * HEAD_DIM + dims[None, :], o, mask=real_row[:, None])
    tl.store(m_ptr + out_rows, m, mask=real_row)
    tl.store(den_ptr + out_rows, den, mask=real_row)


@triton.jit
def attend_steps(
    q: tl.tensor, o: tl.tensor, m: tl.tensor, den: tl.tensor, q_pos: tl.tensor,
    k_ptr: tl.tensor, v_ptr: tl.tensor,
    off: tl.tensor,  # the first step's offsets and validity (``tile_offsets``)
    valid: tl.tensor,
    table_ptr: tl.tensor, seq: tl.tensor, head: tl.tensor,
    begin: tl.tensor,  # first position walked (a multiple of BLOCK_TOKENS)
    end: tl.tensor,  # positions >= end are left to a later walk
    stop: tl.tensor,  # positions >= stop are not read
    layer_off: tl.tensor, num_pages: tl.tensor,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_HEADS: tl.constexpr,
    MAX_BLOCKS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PREFETCH_TABLE: tl.constexpr, HEAD_MAJOR: tl.constexpr,
    CAUSAL: tl.constexpr, EXP2: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """Online-softmax steps over positions ``[begin, end)``, ``BLOCK_TOKENS`` at a time
    (``attend_tile``; the causal mask applied when ``CAUSAL``; ``EXP2`` as there).
    Returns the new ``(o, m, den)`` and the next step's ``(off, valid)``."""
    for start in range(begin, end, BLOCK_TOKENS):
        off, valid, next_off, next_valid = step_offsets(
            off, valid, table_ptr, seq, head, start, stop, layer_off, num_pages, HEAD_DIM,
            PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS, PREFETCH_TABLE, HEAD_MAJOR)
        o, m, den = attend_tile(q, o, m, den, q_pos, k_ptr, v_ptr, off, valid, start,
                                HEAD_DIM, BLOCK_TOKENS, SCALE, DOT_PRECISION, CAUSAL, EXP2)
        off, valid = next_off, next_valid
    return o, m, den, off, valid


@triton.jit
def append_token(
    q: tl.tensor,  # [ROWS, HEAD_DIM]
    o: tl.tensor,  # f32 [ROWS, HEAD_DIM]
    m: tl.tensor,  # f32 [ROWS]
    den: tl.tensor,  # f32 [ROWS]
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    k_new_ptr: tl.tensor,  # sequence b's KV head h: row b * Q_ROWS + h
    v_new_ptr: tl.tensor,
    table_ptr: tl.tensor,
    seq: tl.tensor,
    head: tl.tensor,
    new: tl.tensor,  # the new token's position
    first: tl.tensor,  # this program's split: positions [first, stop)
    stop: tl.tensor,
    layer_off: tl.tensor,
    num_pages: tl.tensor,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    SCALE: tl.constexpr,
    Q_ROWS: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """If the new token at position ``new`` lies in this split and on a real page: store
    its K/V row in the pool and fold it into ``(o, m, den)`` from registers (the same
    rounding as ``attend_tile``: f32 scores, probabilities cast to V's dtype). A position
    past the table or on a missing page is neither stored nor attended, as the scatter
    drops it."""
    dims = tl.arange(0, HEAD_DIM)
    mine = (new >= first) & (new < stop)
    entry = tl.load(table_ptr + seq * MAX_BLOCKS + new // PAGE_SIZE, mask=mine, other=-1)
    put = mine & (entry >= 0) & (entry < num_pages)
    row = (seq.to(tl.int64) * Q_ROWS + head) * HEAD_DIM + dims
    k = tl.load(k_new_ptr + row)
    v = tl.load(v_new_ptr + row)
    slot = layer_off + row_offset(entry, new % PAGE_SIZE, head, HEAD_DIM, PAGE_SIZE, KV_HEADS,
                                  HEAD_MAJOR)
    stored = put & (dims < HEAD_DIM)
    tl.store(k_ptr + slot + dims, k, mask=stored)
    tl.store(v_ptr + slot + dims, v, mask=stored)
    if UPCAST_DOTS:
        v = v.to(tl.float32)
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * SCALE  # [ROWS]
    s = tl.where(put, s, MASKED)
    m_new = tl.maximum(m, s)
    alpha = tl.exp(m - m_new)
    p = tl.where(put, tl.exp(s - m_new), 0.0)
    den = den * alpha + p
    o = o * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return o, m_new, den


@triton.jit
def tile_offsets(
    table_ptr: tl.tensor,
    seq: tl.tensor,
    head: tl.tensor,
    start: tl.tensor,  # first position of the step
    stop: tl.tensor,  # positions >= stop are not read
    layer_off: tl.tensor,  # int64 element offset of the layer read
    num_pages: tl.tensor,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """Where positions ``[start, start + BLOCK_TOKENS)`` of sequence ``seq``'s KV head
    ``head`` lie in the pool, through its block table: int64 element offsets of each
    token's ``HEAD_DIM`` row ``[BLOCK_TOKENS]`` and whether the token is read (below
    ``stop``, on a real page) ``[BLOCK_TOKENS]``."""
    pos = start + tl.arange(0, BLOCK_TOKENS)
    entry = tl.load(table_ptr + seq * MAX_BLOCKS + pos // PAGE_SIZE, mask=pos < stop, other=-1)
    valid = (pos < stop) & (entry >= 0) & (entry < num_pages)
    off = layer_off + row_offset(entry, pos % PAGE_SIZE, head, HEAD_DIM, PAGE_SIZE, KV_HEADS,
                                 HEAD_MAJOR)
    return off, valid


@triton.jit
def row_offset(
    entry: tl.tensor,  # int page id(s)
    slot: tl.tensor,  # int offset(s) in the page
    head: tl.tensor,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
) -> tl.tensor:
    """int64 element offset, within one layer, of the ``HEAD_DIM`` row of KV head
    ``head`` at ``slot`` of page ``entry``: token-major pages ``[P, S, K, D]`` (one
    ``K * D`` run per token) or, with ``HEAD_MAJOR``, ``[P, K, S, D]`` (one ``S * D`` run
    per head)."""
    page = entry.to(tl.int64) * (PAGE_SIZE * KV_HEADS * HEAD_DIM)
    if HEAD_MAJOR:
        return page + (head * PAGE_SIZE + slot) * HEAD_DIM
    return page + (slot * KV_HEADS + head) * HEAD_DIM


@triton.jit
def step_offsets(
    off: tl.tensor,  # this step's offsets when prefetched (read by the step before)
    valid: tl.tensor,
    table_ptr: tl.tensor,
    seq: tl.tensor,
    head: tl.tensor,
    start: tl.tensor,
    stop: tl.tensor,
    layer_off: tl.tensor,
    num_pages: tl.tensor,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """The step at ``start``'s ``(off, valid)`` and those to carry to the next step. With
    ``PREFETCH_TABLE`` this step's come in (read one step ahead) and the next step's table
    entries are read now, so the K/V loads depend on a loop-carried value and Triton's
    pipeliner keeps ``num_stages - 1`` tiles in flight; without it they are read here."""
    if PREFETCH_TABLE:
        next_off, next_valid = tile_offsets(
            table_ptr, seq, head, start + BLOCK_TOKENS, stop, layer_off, num_pages, HEAD_DIM,
            PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS, HEAD_MAJOR)
    else:
        off, valid = tile_offsets(table_ptr, seq, head, start, stop, layer_off, num_pages,
                                  HEAD_DIM, PAGE_SIZE, KV_HEADS, MAX_BLOCKS, BLOCK_TOKENS,
                                  HEAD_MAJOR)
        next_off, next_valid = off, valid
    return off, valid, next_off, next_valid


@triton.jit
def attend_tile(
    q: tl.tensor,  # [ROWS, HEAD_DIM] queries of one KV head (float32 under the interpreter)
    o: tl.tensor,  # f32 [ROWS, HEAD_DIM] unnormalised output so far
    m: tl.tensor,  # f32 [ROWS] running max
    den: tl.tensor,  # f32 [ROWS] running denominator
    q_pos: tl.tensor,  # int [ROWS] last position each row sees (read when CAUSAL)
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    off: tl.tensor,  # int64 [BLOCK_TOKENS] the step's token rows (``tile_offsets``)
    valid: tl.tensor,  # bool [BLOCK_TOKENS] tokens read (``tile_offsets``)
    start: tl.tensor,  # first position of this step
    HEAD_DIM: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
    EXP2: tl.constexpr,  # scores and maxes in log2 units: exps by exp2
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """One online-softmax step of the paged kernels: load the ``[BLOCK_TOKENS, HEAD_DIM]``
    K and V tile of positions ``[start, start + BLOCK_TOKENS)`` at ``off`` (``valid``
    tokens only), score it against ``q`` (row ``r`` sees positions ``<= q_pos[r]`` when
    ``CAUSAL``) and fold it into ``(o, m, den)``. Returns the new ``(o, m, den)``.

    ``(o, den)`` are sums of ``exp(score - m)`` (``exp2`` with ``EXP2``, where ``SCALE``
    carries the factor log2(e), saving a multiply per score). A row that has seen nothing
    keeps ``m = MASKED`` and adds zeros."""
    pos = start + tl.arange(0, BLOCK_TOKENS)  # [BLOCK_TOKENS] token positions
    kv_off = off[:, None] + tl.arange(0, HEAD_DIM)[None, :]  # [BLOCK_TOKENS, HEAD_DIM]
    k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
    if UPCAST_DOTS:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * SCALE  # [ROWS, tokens]
    seen = valid[None, :] & (pos[None, :] <= q_pos[:, None]) if CAUSAL else valid[None, :]
    s = tl.where(seen, s, MASKED)
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new) if EXP2 else tl.exp(m - m_new)  # m, m_new finite
    # A masked score is MASKED: its exp is 0 against a real max, and against the base 0
    # of a row that has seen nothing yet (its max still MASKED): no select per score.
    shifted = s - tl.where(m_new > MASKED, m_new, 0.0)[:, None]
    p = tl.exp2(shifted) if EXP2 else tl.exp(shifted)
    den = den * alpha + tl.sum(p, 1)
    o = o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return o, m_new, den
