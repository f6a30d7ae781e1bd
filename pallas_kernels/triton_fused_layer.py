"""A decoder layer's decode-time projections as fused Triton kernels, launched from JAX
by ``pallas_kernels.triton_launch``; each with its pure-jnp reference and argument checks.

``norm_qkv_rope`` (RMSNorm + q/k/v projections + bias + RoPE, packed for the
decode-append kernel), ``matmul_residual`` (``residual + a @ w (+ b)``: the o and down
projections) and ``norm_gate_up`` (RMSNorm + gate/up projections + SiLU x up). With the
Triton decode-append kernel between them a Llama/Qwen2 layer's decode step is five
launches (plus the split combine) instead of the twelve XLA makes of the same layer
(docs/serving-engine.md). The programs are in ``pallas_kernels.triton_layer_kernels``;
``triton`` and ``jax_triton`` are imported only when a kernel runs, so this module
imports anywhere. Default launch settings: the fastest in a sweep at the Qwen2.5-0.5B
decode shape, 8 rows, on an H100 (``benchmarks/fused_layer_kernels.py``,
docs/serving-engine.md). The ``*_reference`` functions are the same math in jnp, rounded as
``kvjax.models.llama`` rounds; the kernels are tested against them in Triton's
interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.triton_launch import triton_call
from pallas_kernels.triton_paged_decode import (
    H100_SHARED_BYTES,
    check_launch_settings,
    dot_precision,
)

MIN_ROWS = 16  # rows of one program: one mma tile
MAX_ROWS = 64  # rows per program; more rows are more programs
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def block_rows(batch: int) -> int:
    """Rows one program holds: the batch rounded up to a power of two, in [16, 64]."""
    return max(MIN_ROWS, min(MAX_ROWS, 1 << max(batch - 1, 0).bit_length()))


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def _check_rows(x: jax.Array, name: str = "x") -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [B, features] with B >= 1, got shape {x.shape}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} dtype must be one of bfloat16/float16/float32, got {x.dtype}")


def _check_weight(name: str, w: jax.Array | None, shape: tuple[int, ...],
                  dtype: jnp.dtype) -> None:
    if w is None:
        return
    if w.shape != shape or w.dtype != dtype:
        raise ValueError(f"{name} must be {shape} {dtype}, got {w.shape} {w.dtype}")


def _settings(block_n: int, block_k: int, num_warps: int, num_stages: int) -> None:
    _check_block("block_n", block_n)
    _check_block("block_k", block_k)
    check_launch_settings(16, num_warps, num_stages)


def rms_norm_rows(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``w * (x / rms(x)).astype(x.dtype)``, normalised in float32 (the model's RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def _matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """``a @ w`` accumulated in float32 at full precision, rounded to a's dtype."""
    return jnp.dot(a, w, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST).astype(a.dtype)


# ------------------------------------------------------------ RMSNorm + q/k/v + RoPE


def norm_qkv_rope_reference(x: jax.Array, norm_w: jax.Array, wq: jax.Array, wk: jax.Array,
                            wv: jax.Array, bq: jax.Array | None, bk: jax.Array | None,
                            bv: jax.Array | None, cos: jax.Array, sin: jax.Array, *,
                            head_dim: int, eps: float) -> jax.Array:
    """``norm_qkv_rope`` in jnp (same arguments) -> [B, H + 2K, D]."""
    h = rms_norm_rows(x, norm_w, eps)
    y = jnp.concatenate([_matmul(h, w) for w in (wq, wk, wv)], axis=1)
    return _qkv_epilogue(y.reshape(x.shape[0], -1, head_dim), _packed_bias(bq, bk, bv),
                         cos, sin, heads=wq.shape[1] // head_dim)


def _packed_bias(bq: jax.Array | None, bk: jax.Array | None, bv: jax.Array | None
                 ) -> jax.Array | None:
    """[(H + 2K) * D]: the q, k and v biases in one vector, or None without them."""
    if bq is None or bk is None or bv is None:
        return None
    return jnp.concatenate([bq, bk, bv])


def _qkv_epilogue(y: jax.Array, bias: jax.Array | None, cos: jax.Array, sin: jax.Array, *,
                  heads: int) -> jax.Array:
    """The projections ``y`` [B, H + 2K, D] (rounded to the dtype) + ``bias`` (packed,
    ``_packed_bias``), RoPE on the q and k heads, each op's result in the dtype -> [B,
    H + 2K, D]."""
    head_dim = y.shape[2]
    if bias is not None:
        y = y + bias.reshape(1, -1, head_dim)
    c = cos.astype(y.dtype)[:, None, :]
    s = sin.astype(y.dtype)[:, None, :]
    lo, hi = y[..., : head_dim // 2], y[..., head_dim // 2:]
    rotated = jnp.concatenate([lo * c + (-hi) * s, hi * c + lo * s], axis=-1)
    kv_heads = (y.shape[1] - heads) // 2
    return jnp.concatenate([rotated[:, : heads + kv_heads], y[:, heads + kv_heads:]], axis=1)


QKV_BLOCK_K = 256  # default contraction steps (the H100 sweeps' best at 16-bit,
MATMUL_BLOCK_K = 512  # docs/serving-engine.md), cut by ``fitting_block_k`` where a
GATE_UP_BLOCK_K = 128  # dtype or shape makes the tiles too big
SHARED_HEADROOM = 32 * 1024  # shared memory a program needs beside its pipelined tiles


def fitting_block_k(block_k: int, rows: int, cols: int, dtype: jnp.dtype,
                    num_stages: int) -> int:
    """``block_k`` halved (not below 16) until the ``num_stages - 1`` buffered
    ``[rows, block_k]`` and ``[block_k, cols]`` tiles of Triton's software pipeline fit
    an H100's shared memory less ``SHARED_HEADROOM``. The 16-bit Qwen2.5-0.5B defaults
    keep their full step; float32 q/k/v at 256 (265 KB) and float32 gate/up and down
    projections at 32 rows (258 and 256 KB) did not fit and are cut."""
    per_step = max(num_stages - 1, 1) * (rows + cols) * jnp.dtype(dtype).itemsize
    while block_k > 16 and per_step * block_k > H100_SHARED_BYTES - SHARED_HEADROOM:
        block_k //= 2
    return block_k


def norm_qkv_rope(x: jax.Array, norm_w: jax.Array, wq: jax.Array, wk: jax.Array,
                  wv: jax.Array, bq: jax.Array | None, bk: jax.Array | None,
                  bv: jax.Array | None, cos: jax.Array, sin: jax.Array, *, head_dim: int,
                  eps: float, block_k: int | None = None, split_k: int = 1,
                  num_warps: int = 4, num_stages: int = 4) -> jax.Array:
    """RMSNorm of each row, the q/k/v projections (+ bias), RoPE on q and k: one launch,
    or with ``split_k`` > 1 a launch of ``split_k`` times the programs (each a slice of
    the contraction, float32 partials) and one XLA fusion for the sum, bias and RoPE.

    Args:
      x: [B, E] residual rows (bf16/fp16/fp32).
      norm_w: [E] the RMSNorm weight; wq [E, H * D], wk and wv [E, K * D]; bq [H * D],
        bk and bv [K * D] or all three None; all in x's dtype.
      cos, sin: float32 [B, D / 2]: ``cos/sin(position * inv_freq)`` of each row.
      head_dim: D (even, >= 32: each half is one mma tile of at least 16 columns).
      eps: the RMSNorm epsilon.
      block_k, num_warps, num_stages: launch settings (``block_k`` a power of two >= 16;
        None: ``QKV_BLOCK_K`` cut by ``fitting_block_k``); split_k: slices of the
        contraction (>= 1; fewer when it has fewer ``block_k`` steps).

    Returns:
      [B, H + 2K, D] in x's dtype: q and k rotated (rotate-half), then v.

    Raises:
      ValueError: on shapes, dtypes, mixed bias presence or launch settings, before
        launching.
    """
    _check_rows(x)
    batch, hidden = x.shape
    if not isinstance(head_dim, int) or head_dim < 32 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim!r}")
    if wq.ndim != 2 or wk.ndim != 2 or wq.shape[1] % head_dim or wk.shape[1] % head_dim:
        raise ValueError(f"wq and wk must be [E, heads * {head_dim}], got {wq.shape}, "
                         f"{wk.shape}")
    heads, kv_heads = wq.shape[1] // head_dim, wk.shape[1] // head_dim
    _check_weight("norm_w", norm_w, (hidden,), x.dtype)
    _check_weight("wq", wq, (hidden, heads * head_dim), x.dtype)
    for name, w in (("wk", wk), ("wv", wv)):
        _check_weight(name, w, (hidden, kv_heads * head_dim), x.dtype)
    biases = (bq, bk, bv)
    if any(b is None for b in biases) != all(b is None for b in biases):
        raise ValueError("bq, bk and bv must be given together or all be None")
    _check_weight("bq", bq, (heads * head_dim,), x.dtype)
    _check_weight("bk", bk, (kv_heads * head_dim,), x.dtype)
    _check_weight("bv", bv, (kv_heads * head_dim,), x.dtype)
    for name, t in (("cos", cos), ("sin", sin)):
        _check_weight(name, t, (batch, head_dim // 2), jnp.dtype(jnp.float32))
    _settings(16, 16 if block_k is None else block_k, num_warps, num_stages)
    if block_k is None:
        block_k = fitting_block_k(QKV_BLOCK_K, block_rows(batch), head_dim, x.dtype,
                                  num_stages)
    _check_split_k(split_k)
    return _norm_qkv_rope(x, norm_w, wq, wk, wv, bq, bk, bv, cos, sin, head_dim=head_dim,
                          eps=float(eps), block_k=block_k, split_k=split_k,
                          num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("head_dim", "eps", "block_k", "split_k",
                                             "num_warps", "num_stages"))
def _norm_qkv_rope(x: jax.Array, norm_w: jax.Array, wq: jax.Array, wk: jax.Array,
                   wv: jax.Array, bq: jax.Array | None, bk: jax.Array | None,
                   bv: jax.Array | None, cos: jax.Array, sin: jax.Array, *, head_dim: int,
                   eps: float, block_k: int, split_k: int, num_warps: int,
                   num_stages: int) -> jax.Array:
    from pallas_kernels.triton_layer_kernels import norm_qkv_rope_kernel

    batch = x.shape[0]
    heads, kv_heads = wq.shape[1] // head_dim, wk.shape[1] // head_dim
    has_bias = bq is not None
    grid, meta = qkv_launch(batch, x.shape[1], heads, kv_heads, head_dim, x.dtype,
                            has_bias=has_bias, eps=eps, block_k=block_k, split_k=split_k)
    splits = grid[2]
    shape = (batch, heads + 2 * kv_heads, head_dim)
    out = jax.ShapeDtypeStruct(shape, x.dtype) if splits == 1 else \
        jax.ShapeDtypeStruct((splits, *shape), jnp.float32)
    bias = (bq, bk, bv) if has_bias else (norm_w, norm_w, norm_w)  # unread without bias
    y = triton_call(x, norm_w, wq, wk, wv, *bias, cos, sin, kernel=norm_qkv_rope_kernel,
                    out_shape=out, grid=grid, num_warps=num_warps, num_stages=num_stages,
                    name="kvjax_norm_qkv_rope", **meta)
    if splits == 1:
        return y
    # the splits' sum rounded as one matmul's result, then bias and RoPE as the reference
    return _qkv_epilogue(y.sum(axis=0).astype(x.dtype), _packed_bias(bq, bk, bv), cos, sin,
                         heads=heads)


def qkv_launch(batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype, *, has_bias: bool, eps: float, block_k: int,
               split_k: int = 1) -> tuple[tuple[int, int, int], dict[str, object]]:
    """Grid ``(heads, row blocks, splits)`` and meta-parameters of
    ``norm_qkv_rope_kernel``; splits are whole ``block_k`` steps, none empty."""
    rows = block_rows(batch)
    block_k = min(block_k, _pow2_at_least(hidden))
    splits, per_split = split_plan(hidden, block_k, split_k)
    return (heads + 2 * kv_heads, -(-batch // rows), splits), dict(
        BATCH=batch, HIDDEN=hidden, HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=rows, BLOCK_K=block_k, EPS=eps, HAS_BIAS=has_bias,
        DOT_PRECISION=dot_precision(dtype), SPLIT_K=splits, K_PER_SPLIT=per_split)


def split_plan(k_dim: int, block_k: int, split_k: int) -> tuple[int, int]:
    """``(splits, elements per split)`` for a contraction of ``k_dim`` walked ``block_k``
    at a time in at most ``split_k`` slices of whole steps, none empty."""
    steps = -(-k_dim // block_k)
    per_split = -(-steps // min(split_k, steps))
    return -(-steps // per_split), per_split * block_k


def _check_split_k(split_k: object) -> None:
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be an int >= 1, got {split_k!r}")


def _pow2_at_least(n: int) -> int:
    """The smallest power of two >= max(n, 16)."""
    return max(16, 1 << (n - 1).bit_length())


# ------------------------------------------------------------ residual + a @ w (+ b)


def matmul_residual_reference(a: jax.Array, w: jax.Array, b: jax.Array | None,
                              residual: jax.Array) -> jax.Array:
    """``matmul_residual`` in jnp -> [B, N]."""
    y = _matmul(a, w)
    if b is not None:
        y = y + b
    return residual + y


def matmul_residual(a: jax.Array, w: jax.Array, b: jax.Array | None, residual: jax.Array,
                    *, block_n: int = 32, block_k: int | None = None, split_k: int = 1,
                    num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """``residual + (a @ w + b)``, the matmul accumulated in float32: one launch, or with
    ``split_k`` > 1 a launch of ``split_k`` times the programs (each a slice of the
    contraction, float32 partials) and one XLA fusion summing them into the residual.

    Args:
      a: [B, K] rows; w: [K, N]; b: [N] or None; residual: [B, N]; one dtype.
      block_n, block_k: output columns and contraction per step of a program (powers
        of two >= 16; ``block_k`` None: ``MATMUL_BLOCK_K`` cut by ``fitting_block_k``);
        split_k: slices of the contraction (>= 1; fewer when K has fewer ``block_k``
        steps); num_warps, num_stages: launch settings.

    Returns:
      [B, N] in the rows' dtype.

    Raises:
      ValueError: on shapes, dtypes or launch settings, before launching.
    """
    _check_rows(a, "a")
    if w.ndim != 2:
        raise ValueError(f"w must be [K, N], got shape {w.shape}")
    _check_weight("w", w, (a.shape[1], w.shape[1]), a.dtype)
    _check_weight("b", b, (w.shape[1],), a.dtype)
    _check_weight("residual", residual, (a.shape[0], w.shape[1]), a.dtype)
    _settings(block_n, 16 if block_k is None else block_k, num_warps, num_stages)
    if block_k is None:
        block_k = fitting_block_k(MATMUL_BLOCK_K, block_rows(a.shape[0]), block_n, a.dtype,
                                  num_stages)
    _check_split_k(split_k)
    return _matmul_residual(a, w, b, residual, block_n=block_n, block_k=block_k,
                            split_k=split_k, num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps",
                                             "num_stages"))
def _matmul_residual(a: jax.Array, w: jax.Array, b: jax.Array | None, residual: jax.Array, *,
                     block_n: int, block_k: int, split_k: int, num_warps: int,
                     num_stages: int) -> jax.Array:
    from pallas_kernels.triton_layer_kernels import matmul_residual_kernel

    (batch, k_dim), n = a.shape, w.shape[1]
    grid, meta = matmul_launch(batch, k_dim, n, a.dtype, has_bias=b is not None,
                               block_n=block_n, block_k=block_k, split_k=split_k)
    splits = grid[2]
    out = jax.ShapeDtypeStruct((batch, n), a.dtype) if splits == 1 else \
        jax.ShapeDtypeStruct((splits, batch, n), jnp.float32)
    y = triton_call(a, w, residual if b is None else b, residual,  # b unread if None
                    kernel=matmul_residual_kernel, out_shape=out, grid=grid,
                    num_warps=num_warps, num_stages=num_stages,
                    name="kvjax_matmul_residual", **meta)
    if splits == 1:
        return y
    y = y.sum(axis=0).astype(a.dtype)  # the splits' sum, rounded as one matmul's result
    if b is not None:
        y = y + b
    return residual + y


def matmul_launch(batch: int, k_dim: int, n: int, dtype: jnp.dtype, *, has_bias: bool,
                  block_n: int, block_k: int, split_k: int = 1
                  ) -> tuple[tuple[int, int, int], dict[str, object]]:
    """Grid ``(column blocks, row blocks, splits)`` and meta-parameters of
    ``matmul_residual_kernel``; splits are whole ``block_k`` steps, none empty."""
    rows = block_rows(batch)
    block_k = min(block_k, _pow2_at_least(k_dim))
    splits, per_split = split_plan(k_dim, block_k, split_k)
    return (-(-n // block_n), -(-batch // rows), splits), dict(
        BATCH=batch, K_DIM=k_dim, N=n, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=has_bias, DOT_PRECISION=dot_precision(dtype), SPLIT_K=splits,
        K_PER_SPLIT=per_split)


# ------------------------------------------------------------ RMSNorm + SwiGLU's first half


def norm_gate_up_reference(x: jax.Array, norm_w: jax.Array, wg: jax.Array, wu: jax.Array, *,
                           eps: float) -> jax.Array:
    """``norm_gate_up`` in jnp -> [B, I]."""
    h = rms_norm_rows(x, norm_w, eps)
    return jax.nn.silu(_matmul(h, wg)) * _matmul(h, wu)


def norm_gate_up(x: jax.Array, norm_w: jax.Array, wg: jax.Array, wu: jax.Array, *,
                 eps: float, block_n: int = 64, block_k: int | None = None,
                 num_warps: int = 8, num_stages: int = 4) -> jax.Array:
    """``silu(norm(x) @ wg) * (norm(x) @ wu)`` with the RMSNorm ``norm``: one launch.

    Args:
      x: [B, E] residual rows; norm_w: [E]; wg, wu: [E, I]; one dtype.
      eps: the RMSNorm epsilon; block_n, block_k, num_warps, num_stages: launch
        settings as ``matmul_residual`` (``block_k`` None: ``GATE_UP_BLOCK_K`` cut by
        ``fitting_block_k`` for the gate and up tiles, ``2 * block_n`` columns).

    Returns:
      [B, I] in x's dtype.

    Raises:
      ValueError: on shapes, dtypes or launch settings, before launching.
    """
    _check_rows(x)
    if wg.ndim != 2:
        raise ValueError(f"wg must be [E, I], got shape {wg.shape}")
    _check_weight("norm_w", norm_w, (x.shape[1],), x.dtype)
    _check_weight("wg", wg, (x.shape[1], wg.shape[1]), x.dtype)
    _check_weight("wu", wu, wg.shape, x.dtype)
    _settings(block_n, 16 if block_k is None else block_k, num_warps, num_stages)
    if block_k is None:
        block_k = fitting_block_k(GATE_UP_BLOCK_K, block_rows(x.shape[0]), 2 * block_n,
                                  x.dtype, num_stages)
    return _norm_gate_up(x, norm_w, wg, wu, eps=float(eps), block_n=block_n, block_k=block_k,
                         num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "block_k", "num_warps",
                                             "num_stages"))
def _norm_gate_up(x: jax.Array, norm_w: jax.Array, wg: jax.Array, wu: jax.Array, *,
                  eps: float, block_n: int, block_k: int, num_warps: int,
                  num_stages: int) -> jax.Array:
    from pallas_kernels.triton_layer_kernels import norm_gate_up_kernel

    (batch, hidden), inter = x.shape, wg.shape[1]
    grid, meta = gate_up_launch(batch, hidden, inter, x.dtype, eps=eps, block_n=block_n,
                                block_k=block_k)
    return triton_call(x, norm_w, wg, wu, kernel=norm_gate_up_kernel,
                       out_shape=jax.ShapeDtypeStruct((batch, inter), x.dtype), grid=grid,
                       num_warps=num_warps, num_stages=num_stages, name="kvjax_norm_gate_up",
                       **meta)


def gate_up_launch(batch: int, hidden: int, inter: int, dtype: jnp.dtype, *, eps: float,
                   block_n: int, block_k: int) -> tuple[tuple[int, int], dict[str, object]]:
    """Grid and meta-parameters of ``norm_gate_up_kernel``."""
    rows = block_rows(batch)
    return (-(-inter // block_n), -(-batch // rows)), dict(
        BATCH=batch, HIDDEN=hidden, INTER=inter, BLOCK_M=rows, BLOCK_N=block_n,
        BLOCK_K=min(block_k, _pow2_at_least(hidden)), EPS=eps,
        DOT_PRECISION=dot_precision(dtype))
