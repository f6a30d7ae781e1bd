"""The fused decode-layer Triton kernels (Triton's interpreter on CPU) against their jnp
references and a float64 NumPy computation; argument checks; the sm_90 compile."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from triton_testing import compile_for_h100, interpreted_jax_triton  # noqa: F401

from pallas_kernels import triton_fused_layer as tfl
from pallas_kernels.triton_paged_decode import H100_SHARED_BYTES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any,
          std: float = 1.0) -> jax.Array:
    return jnp.asarray(rng.normal(0.0, std, shape), dtype)


def _close(got: jax.Array, want: jax.Array, dtype: Any) -> None:
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want64).max()))
    np.testing.assert_allclose(got64, want64, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _rms64(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def _rope_tables(rng: np.random.Generator, batch: int, half: int
                 ) -> tuple[jax.Array, jax.Array]:
    angles = rng.integers(0, 300, batch)[:, None] * (1e4 ** (-np.arange(half) / half))
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


QKV_CASES = [  # batch, hidden, heads, kv_heads, head_dim, bias, split_k
    (1, 64, 2, 1, 32, True, 1),
    (3, 96, 4, 2, 64, False, 3),  # three 32-deep splits
    (8, 40, 3, 3, 32, True, 2),  # hidden not a multiple of the step (a short split); MHA
    (17, 64, 8, 1, 32, True, 1),  # 32-row tile, MQA
    (70, 48, 2, 2, 32, False, 4),  # two 64-row programs; 4 asked, 2 steps: 2 splits
    (5, 96, 4, 2, 32, True, 2),  # splits of 2 and 1 steps, with bias
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", QKV_CASES)
def test_norm_qkv_rope_matches_reference(case: tuple[int, ...], dtype: Any) -> None:
    batch, hidden, heads, kv_heads, head_dim, bias, split_k = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = _rand(rng, (batch, hidden), dtype)
    norm_w = _rand(rng, (hidden,), dtype)
    ws = [_rand(rng, (hidden, n * head_dim), dtype, hidden ** -0.5)
          for n in (heads, kv_heads, kv_heads)]
    bs = [_rand(rng, (n * head_dim,), dtype) if bias else None
          for n in (heads, kv_heads, kv_heads)]
    cos, sin = _rope_tables(rng, batch, head_dim // 2)
    got = tfl.norm_qkv_rope(x, norm_w, *ws, *bs, cos, sin, head_dim=head_dim, eps=1e-5,
                            block_k=32, split_k=split_k)
    assert got.shape == (batch, heads + 2 * kv_heads, head_dim) and got.dtype == dtype
    want = tfl.norm_qkv_rope_reference(x, norm_w, *ws, *bs, cos, sin, head_dim=head_dim,
                                       eps=1e-5)
    _close(got, want, dtype)
    if dtype == jnp.float32:  # and an independent float64 computation
        h = _rms64(np.asarray(x, np.float64), np.asarray(norm_w, np.float64), 1e-5)
        c, s = np.asarray(cos, np.float64)[:, None], np.asarray(sin, np.float64)[:, None]
        parts = []
        for w, b, rot in zip(ws, bs, (True, True, False), strict=True):
            y = h @ np.asarray(w, np.float64) + (0 if b is None else np.asarray(b, np.float64))
            y = y.reshape(batch, -1, head_dim)
            lo, hi = y[..., :head_dim // 2], y[..., head_dim // 2:]
            parts.append(np.concatenate([lo * c - hi * s, hi * c + lo * s], -1) if rot else y)
        _close(got, jnp.asarray(np.concatenate(parts, axis=1)), dtype)


MATMUL_CASES = [  # batch, k, n, bias, block_n, split_k
    (1, 64, 32, False, 32, 1),
    (5, 100, 50, True, 16, 1),  # ragged k and n
    (5, 100, 50, True, 16, 3),  # 4 steps of 32 in 2 splits of 2 (the last one ragged)
    (16, 256, 96, False, 32, 4),
    (2, 64, 32, False, 32, 8),  # more splits asked than steps: one a step
    (33, 48, 64, True, 64, 1),  # 64-row tile
    (65, 32, 16, False, 16, 1),  # two 64-row programs
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_matmul_residual_matches_reference(case: tuple[int, ...], dtype: Any) -> None:
    batch, k, n, bias, block_n, split_k = case
    rng = np.random.default_rng(hash(case) % 2**32 + 1)
    a = _rand(rng, (batch, k), dtype)
    w = _rand(rng, (k, n), dtype, k ** -0.5)
    b = _rand(rng, (n,), dtype) if bias else None
    res = _rand(rng, (batch, n), dtype)
    got = tfl.matmul_residual(a, w, b, res, block_n=block_n, block_k=32, split_k=split_k)
    assert got.shape == (batch, n) and got.dtype == dtype
    _close(got, tfl.matmul_residual_reference(a, w, b, res), dtype)
    if dtype == jnp.float32:
        want = (np.asarray(res, np.float64) + np.asarray(a, np.float64) @ np.asarray(w, np.float64)
                + (0 if b is None else np.asarray(b, np.float64)))
        _close(got, jnp.asarray(want), dtype)


def test_split_launches() -> None:
    """Splits are whole contraction steps and none is empty (matmul and q/k/v)."""
    grid, meta = tfl.matmul_launch(5, 100, 50, jnp.float32, has_bias=False, block_n=16,
                                   block_k=32, split_k=3)
    assert grid == (4, 1, 2) and meta["K_PER_SPLIT"] == 64 and meta["SPLIT_K"] == 2
    grid, meta = tfl.matmul_launch(8, 4864, 896, jnp.bfloat16, has_bias=False, block_n=32,
                                   block_k=128, split_k=4)
    assert grid == (28, 1, 4) and meta["K_PER_SPLIT"] == 10 * 128  # 38 steps: 10+10+10+8
    with pytest.raises(ValueError, match="split_k must be an int >= 1"):
        tfl.matmul_residual(jnp.ones((2, 64)), jnp.ones((64, 32)), None, jnp.ones((2, 32)),
                            split_k=0)
    grid, meta = tfl.qkv_launch(8, 896, 14, 2, 64, jnp.bfloat16, has_bias=True, eps=1e-6,
                                block_k=128, split_k=4)
    assert grid == (18, 1, 4) and meta["K_PER_SPLIT"] == 256  # 7 steps: 2+2+2+1
    grid, meta = tfl.qkv_launch(8, 896, 14, 2, 64, jnp.bfloat16, has_bias=True, eps=1e-6,
                                block_k=256)
    assert grid == (18, 1, 1) and meta["SPLIT_K"] == 1
    x = jnp.ones((2, 64))
    cos = jnp.ones((2, 16), jnp.float32)
    with pytest.raises(ValueError, match="split_k must be an int >= 1"):
        tfl.norm_qkv_rope(x, jnp.ones(64), jnp.ones((64, 64)), jnp.ones((64, 32)),
                          jnp.ones((64, 32)), None, None, None, cos, cos, head_dim=32,
                          eps=1e-6, split_k=True)


GATE_UP_CASES = [  # batch, hidden, inter, block_n
    (1, 64, 96, 32),
    (7, 40, 50, 16),  # ragged hidden and inter
    (24, 128, 64, 64),
    (66, 32, 32, 16),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", GATE_UP_CASES)
def test_norm_gate_up_matches_reference(case: tuple[int, ...], dtype: Any) -> None:
    batch, hidden, inter, block_n = case
    rng = np.random.default_rng(hash(case) % 2**32 + 2)
    x = _rand(rng, (batch, hidden), dtype)
    norm_w = _rand(rng, (hidden,), dtype)
    wg = _rand(rng, (hidden, inter), dtype, hidden ** -0.5)
    wu = _rand(rng, (hidden, inter), dtype, hidden ** -0.5)
    got = tfl.norm_gate_up(x, norm_w, wg, wu, eps=1e-6, block_n=block_n, block_k=32)
    assert got.shape == (batch, inter) and got.dtype == dtype
    _close(got, tfl.norm_gate_up_reference(x, norm_w, wg, wu, eps=1e-6), dtype)
    if dtype == jnp.float32:
        h = _rms64(np.asarray(x, np.float64), np.asarray(norm_w, np.float64), 1e-6)
        g, u = h @ np.asarray(wg, np.float64), h @ np.asarray(wu, np.float64)
        _close(got, jnp.asarray(g / (1 + np.exp(-g)) * u), dtype)


def test_bad_arguments_raise_before_launch() -> None:
    f32 = jnp.float32
    x, nw = jnp.ones((2, 64), f32), jnp.ones((64,), f32)
    wq, wk = jnp.ones((64, 64), f32), jnp.ones((64, 32), f32)
    cs = jnp.ones((2, 16), f32)
    ok = dict(head_dim=32, eps=1e-6)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 32"):
        tfl.norm_qkv_rope(x, nw, wq, wk, wk, None, None, None, cs, cs, head_dim=16, eps=1e-6)
    with pytest.raises(ValueError, match="given together"):
        tfl.norm_qkv_rope(x, nw, wq, wk, wk, jnp.ones((64,), f32), None, None, cs, cs, **ok)
    with pytest.raises(ValueError, match="wv must be"):
        tfl.norm_qkv_rope(x, nw, wq, wk, wq, None, None, None, cs, cs, **ok)
    with pytest.raises(ValueError, match="cos must be"):
        tfl.norm_qkv_rope(x, nw, wq, wk, wk, None, None, None, cs[:1], cs, **ok)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tfl.norm_gate_up(x.astype(jnp.int32), nw, wq, wq, eps=1e-6)
    with pytest.raises(ValueError, match="B >= 1"):
        tfl.matmul_residual(jnp.ones((0, 64), f32), wq, None, jnp.ones((0, 64), f32))
    with pytest.raises(ValueError, match="residual must be"):
        tfl.matmul_residual(x, wq, None, jnp.ones((2, 32), f32))
    with pytest.raises(ValueError, match="w must be"):
        tfl.matmul_residual(x, wq.astype(jnp.bfloat16), None, x)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        tfl.matmul_residual(x, wq, None, x, block_n=24)
    with pytest.raises(ValueError, match="num_warps"):
        tfl.norm_gate_up(x, nw, wq, wq, eps=1e-6, num_warps=3)
    with pytest.raises(ValueError, match="wu must be"):
        tfl.norm_gate_up(x, nw, wq, wk, eps=1e-6)


def test_kernels_compile_for_h100() -> None:
    """The three programs at their default launches (and the two split-K variants)
    compile for sm_90 down to the cubin and fit an H100's shared memory: the
    Qwen2.5-0.5B decode shapes (bf16 at 8 and 32 rows, float32 at 8, 32 and 64: 32
    failed on an H100 before ``fitting_block_k``) and a head_dim-128 shape."""
    results = compile_for_h100([[8, 896, 14, 2, 64, 4864, "bfloat16"],
                                [32, 896, 14, 2, 64, 4864, "bfloat16"],
                                [8, 896, 14, 2, 64, 4864, "float32"],
                                [32, 896, 14, 2, 64, 4864, "float32"],
                                [64, 896, 14, 2, 64, 4864, "float32"],
                                [8, 2048, 16, 4, 128, 8192, "bfloat16"]], kernel="layer")
    assert len(results) == 6
    for r in results:
        assert set(r) == {"norm_qkv_rope", "norm_qkv_rope_split", "matmul_residual",
                          "matmul_residual_split", "norm_gate_up"}
        assert all(0 < v <= H100_SHARED_BYTES for v in r.values()), r


def test_fitting_block_k() -> None:
    """16-bit Qwen2.5-0.5B defaults keep their full step at every row block; float32
    steps are cut until the buffered tiles fit; never below 16."""
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    for rows in (16, 32, 64):
        assert tfl.fitting_block_k(tfl.QKV_BLOCK_K, rows, 64, bf16, 4) == 256
        assert tfl.fitting_block_k(tfl.MATMUL_BLOCK_K, rows, 32, bf16, 3) == 512
        assert tfl.fitting_block_k(tfl.GATE_UP_BLOCK_K, rows, 128, bf16, 4) == 128
    assert tfl.fitting_block_k(tfl.QKV_BLOCK_K, 16, 64, f32, 4) == 128
    assert tfl.fitting_block_k(tfl.MATMUL_BLOCK_K, 32, 32, f32, 3) == 256
    assert tfl.fitting_block_k(tfl.GATE_UP_BLOCK_K, 32, 128, f32, 4) == 64
    assert tfl.fitting_block_k(1024, 64, 4096, f32, 8) == 16
    for block_k, rows, cols, stages in [(512, 16, 32, 3), (256, 64, 256, 5), (128, 32, 96, 2)]:
        got = tfl.fitting_block_k(block_k, rows, cols, f32, stages)
        assert (stages - 1) * (rows + cols) * 4 * got <= (
            tfl.H100_SHARED_BYTES - tfl.SHARED_HEADROOM) or got == 16
        assert got == block_k or (stages - 1) * (rows + cols) * 4 * 2 * got > (
            tfl.H100_SHARED_BYTES - tfl.SHARED_HEADROOM)
