"""Triton programs of a decoder layer's projections at decode time (imports ``triton``:
load it lazily).

A decode step multiplies a few rows (the running sequences) by each weight matrix, so
every projection reads its weights once and is bound by memory and by launches, not by
arithmetic. These programs fuse the elementwise work around the matmuls into them, so a
Llama/Qwen2 layer's decode step is four launches plus the attention kernel:

* ``norm_qkv_rope_kernel``: RMSNorm of the residual rows, the q/k/v projections (+ bias)
  and RoPE, written packed ``[B, H + 2K, D]`` (what ``paged_decode_append_kernel`` reads).
  One program per output head, so the rotate-half pairs ``(d, d + D/2)`` are two
  accumulators of the same program.
* ``matmul_residual_kernel``: ``residual + a @ w (+ bias)``: the o and down projections
  with the residual add.
* ``norm_gate_up_kernel``: RMSNorm, the gate and up projections and ``silu(g) * u``.

Each program holds ``BLOCK_M`` rows (a power of two >= 16: one mma tile, rows past the
batch masked) and ``BLOCK_N`` output columns, and walks the contraction ``BLOCK_K`` at a
time. The RMSNorm is recomputed by every program from the rows (``B x hidden``, a few KiB
from L2) instead of being a launch of its own. Rounding follows the model's reference
(``kvjax.models.llama``): norm in float32 rounded to the dtype before the weight, matmul
accumulated in float32 and rounded to the dtype, then each elementwise op's result in the
dtype. Launched by ``pallas_kernels.triton_fused_layer`` (``triton_launch``: arrays, then
the outputs, then the ``tl.constexpr`` meta-parameters by name).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pallas_kernels.triton_decode_kernel import UPCAST_DOTS

INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def output_tile(BATCH: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """Program ``(column block, row block)``'s rows and columns of a ``[BATCH, N]``
    output, with their in-bounds masks: (rows, row_ok, cols, col_ok)."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < BATCH, cols, cols < N


@triton.jit
def rms_scale(x_ptr: tl.tensor, rows: tl.tensor, row_ok: tl.tensor, HIDDEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr) -> tl.tensor:
    """f32 [BLOCK_M]: ``rsqrt(mean(x ** 2) + EPS)`` of rows ``rows`` of x [B, HIDDEN]."""
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * HIDDEN + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < HIDDEN), other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(total / HIDDEN + EPS)


@triton.jit
def normed_tile(x_ptr: tl.tensor, norm_ptr: tl.tensor, rows: tl.tensor, row_ok: tl.tensor,
                scale: tl.tensor, cols: tl.tensor, col_ok: tl.tensor,
                HIDDEN: tl.constexpr) -> tl.tensor:
    """``norm_w * (x * scale).to(dtype)`` of rows ``rows``, columns ``cols``, in x's dtype
    (zero outside the rows and columns)."""
    x = tl.load(x_ptr + rows[:, None] * HIDDEN + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    w = tl.load(norm_ptr + cols, mask=col_ok, other=0.0)
    y = rounded(x.to(tl.float32) * scale[:, None], x.dtype)
    return rounded(w.to(tl.float32)[None, :] * y, x.dtype).to(x.dtype)


@triton.jit
def normed_two_matmuls(x_ptr: tl.tensor, norm_ptr: tl.tensor, w1_ptr: tl.tensor,
                       w2_ptr: tl.tensor, width: tl.tensor, rows: tl.tensor, row_ok: tl.tensor,
                       cols: tl.tensor, col_ok: tl.tensor, k_begin: tl.tensor,
                       k_end: tl.tensor, HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, EPS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """f32 ``(norm(x) @ w1[:, cols], norm(x) @ w2[:, cols])`` for rows ``rows``: the
    RMSNorm of the rows (``norm_ptr`` its weight; over all of ``HIDDEN``) contracted with
    two ``[HIDDEN, width]`` row-major matrices in one pass over contraction positions
    ``[k_begin, k_end)`` (``k_begin`` a multiple of ``BLOCK_K``)."""
    scale = rms_scale(x_ptr, rows, row_ok, HIDDEN, BLOCK_M, BLOCK_K, EPS)
    acc1 = tl.zeros((BLOCK_M, cols.shape[0]), tl.float32)
    acc2 = tl.zeros((BLOCK_M, cols.shape[0]), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HIDDEN
        a = normed_tile(x_ptr, norm_ptr, rows, row_ok, scale, ks, k_ok, HIDDEN)
        at = ks[:, None].to(tl.int64) * width + cols[None, :]
        ok = k_ok[:, None] & col_ok[None, :]
        acc1 = dot_acc(a, tl.load(w1_ptr + at, mask=ok, other=0.0), acc1, DOT_PRECISION)
        acc2 = dot_acc(a, tl.load(w2_ptr + at, mask=ok, other=0.0), acc2, DOT_PRECISION)
    return acc1, acc2


@triton.jit
def dot_acc(a: tl.tensor, w: tl.tensor, acc: tl.tensor, DOT_PRECISION: tl.constexpr
            ) -> tl.tensor:
    """``acc + a @ w`` in float32 (16-bit operands upcast under the interpreter)."""
    if UPCAST_DOTS:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def rounded(x: tl.tensor, dtype: tl.constexpr) -> tl.tensor:
    """f32 ``x`` rounded to ``dtype`` (to nearest, ties to even) and back to float32: one
    op's result in the dtype. Triton's interpreter truncates float32 -> bfloat16, so under
    it the rounding is done on the bits (finite values), as the GPU's conversion does."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def norm_qkv_rope_kernel(
    x_ptr: tl.tensor,  # [B, HIDDEN] residual rows
    norm_ptr: tl.tensor,  # [HIDDEN] the input RMSNorm's weight
    wq_ptr: tl.tensor,  # [HIDDEN, HEADS * HEAD_DIM]
    wk_ptr: tl.tensor,  # [HIDDEN, KV_HEADS * HEAD_DIM]
    wv_ptr: tl.tensor,  # [HIDDEN, KV_HEADS * HEAD_DIM]
    bq_ptr: tl.tensor,  # [HEADS * HEAD_DIM] (read only with HAS_BIAS)
    bk_ptr: tl.tensor,  # [KV_HEADS * HEAD_DIM]
    bv_ptr: tl.tensor,  # [KV_HEADS * HEAD_DIM]
    cos_ptr: tl.tensor,  # f32 [B, HEAD_DIM // 2]: cos(position * inv_freq)
    sin_ptr: tl.tensor,  # f32 [B, HEAD_DIM // 2]
    out_ptr: tl.tensor,  # [B, HEADS + 2 * KV_HEADS, HEAD_DIM]: q, k (rotated), v; with
    # SPLIT_K > 1 f32 [SPLIT_K, B, HEADS + 2 * KV_HEADS, HEAD_DIM]: each split's partial
    # norm(x) @ w (no bias, no RoPE; the caller sums the splits and applies them)
    BATCH: tl.constexpr,
    HIDDEN: tl.constexpr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
) -> None:
    """Program ``(head, row block, split)``: head ``h`` of the packed output for BLOCK_M
    rows, contraction ``[split * K_PER_SPLIT, ...)``."""
    head = tl.program_id(0)
    split = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < BATCH
    HALF: tl.constexpr = HEAD_DIM // 2
    half = tl.arange(0, HALF)
    if head < HEADS:
        w_ptr = wq_ptr + head * HEAD_DIM
        b_ptr = bq_ptr + head * HEAD_DIM
        width = HEADS * HEAD_DIM
    elif head < HEADS + KV_HEADS:
        w_ptr = wk_ptr + (head - HEADS) * HEAD_DIM
        b_ptr = bk_ptr + (head - HEADS) * HEAD_DIM
        width = KV_HEADS * HEAD_DIM
    else:
        w_ptr = wv_ptr + (head - HEADS - KV_HEADS) * HEAD_DIM
        b_ptr = bv_ptr + (head - HEADS - KV_HEADS) * HEAD_DIM
        width = KV_HEADS * HEAD_DIM

    lo, hi = normed_two_matmuls(x_ptr, norm_ptr, w_ptr, w_ptr + HALF, width, rows, row_ok,
                                half, half < HALF, split * K_PER_SPLIT,
                                tl.minimum((split + 1) * K_PER_SPLIT, HIDDEN), HIDDEN,
                                BLOCK_M, BLOCK_K, EPS, DOT_PRECISION)
    out_rows = out_ptr + rows[:, None].to(tl.int64) * ((HEADS + 2 * KV_HEADS) * HEAD_DIM) \
        + head * HEAD_DIM
    if SPLIT_K > 1:  # the partial
        out_rows += split.to(tl.int64) * (BATCH * (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        tl.store(out_rows + half[None, :], lo, mask=row_ok[:, None])
        tl.store(out_rows + HALF + half[None, :], hi, mask=row_ok[:, None])
        return

    dtype: tl.constexpr = out_ptr.dtype.element_ty
    lo = rounded(lo, dtype)
    hi = rounded(hi, dtype)
    if HAS_BIAS:
        lo = rounded(lo + tl.load(b_ptr + half).to(tl.float32)[None, :], dtype)
        hi = rounded(hi + tl.load(b_ptr + HALF + half).to(tl.float32)[None, :], dtype)
    table = rows[:, None] * HALF + half[None, :]
    cos = rounded(tl.load(cos_ptr + table, mask=row_ok[:, None], other=1.0), dtype)
    sin = rounded(tl.load(sin_ptr + table, mask=row_ok[:, None], other=0.0), dtype)
    rotate = head < HEADS + KV_HEADS  # q and k heads; v is stored as projected
    # rotate-half: [lo, hi] * cos + [-hi, lo] * sin, each product rounded as the reference
    rot_lo = rounded(lo * cos, dtype) + rounded(-hi * sin, dtype)
    rot_hi = rounded(hi * cos, dtype) + rounded(lo * sin, dtype)
    lo = tl.where(rotate, rot_lo, lo)
    hi = tl.where(rotate, rot_hi, hi)
    tl.store(out_rows + half[None, :], lo.to(dtype), mask=row_ok[:, None])
    tl.store(out_rows + HALF + half[None, :], hi.to(dtype), mask=row_ok[:, None])


@triton.jit
def matmul_residual_kernel(
    a_ptr: tl.tensor,  # [B, K_DIM]
    w_ptr: tl.tensor,  # [K_DIM, N]
    b_ptr: tl.tensor,  # [N] (read only with HAS_BIAS)
    res_ptr: tl.tensor,  # [B, N]
    out_ptr: tl.tensor,  # [B, N]: res + (a @ w (+ b)).to(dtype), in res's dtype; with
    # SPLIT_K > 1 f32 [SPLIT_K, B, N]: each split's partial a @ w (bias and res unread)
    BATCH: tl.constexpr,
    K_DIM: tl.constexpr,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
) -> None:
    """Program ``(column block, row block, split)``: contraction ``[split * K_PER_SPLIT,
    ...)``."""
    rows, row_ok, cols, col_ok = output_tile(BATCH, N, BLOCK_M, BLOCK_N)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(split * K_PER_SPLIT, tl.minimum((split + 1) * K_PER_SPLIT, K_DIM), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K_DIM
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K_DIM + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(a, w, acc, DOT_PRECISION)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:  # the partial; the caller sums the splits
        tl.store(out_ptr + split.to(tl.int64) * (BATCH * N) + at, acc, mask=ok)
    else:
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        y = rounded(acc, dtype)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = rounded(y + bias[None, :], dtype)
        res = tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (res + y).to(dtype), mask=ok)


@triton.jit
def norm_gate_up_kernel(
    x_ptr: tl.tensor,  # [B, HIDDEN] residual rows
    norm_ptr: tl.tensor,  # [HIDDEN] the post-attention RMSNorm's weight
    wg_ptr: tl.tensor,  # [HIDDEN, INTER]
    wu_ptr: tl.tensor,  # [HIDDEN, INTER]
    out_ptr: tl.tensor,  # [B, INTER]: silu(norm(x) @ wg) * (norm(x) @ wu)
    BATCH: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Program ``(column block, row block)``."""
    rows, row_ok, cols, col_ok = output_tile(BATCH, INTER, BLOCK_M, BLOCK_N)
    gate, up = normed_two_matmuls(x_ptr, norm_ptr, wg_ptr, wu_ptr, INTER, rows, row_ok, cols,
                                  col_ok, 0, HIDDEN, HIDDEN, BLOCK_M, BLOCK_K, EPS,
                                  DOT_PRECISION)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    g = rounded(gate, dtype)
    silu = rounded(g * tl.sigmoid(g), dtype)
    y = silu * rounded(up, dtype)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * INTER + cols[None, :], y.to(dtype),
             mask=row_ok[:, None] & col_ok[None, :])

