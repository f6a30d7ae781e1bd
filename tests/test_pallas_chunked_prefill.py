"""Pallas chunked-prefill kernel (interpret mode) against both jnp references."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache.paged import paged_attention_reference
from pallas_kernels.chunked_prefill import (
    paged_prefill_attention,
    paged_prefill_attention_reference,
)

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}
_kvjax_reference = jax.jit(paged_attention_reference)

# (kv_heads, group, head_dim, page_size, max_blocks, T, dtype, block_q, pages_per_block,
#  q_lens, lengths)
CASES = [
    (2, 1, 64, 8, 4, 5, F32, 2, 1, [0, 5, 3], [0, 13, 32]),
    (1, 4, 64, 16, 3, 6, F32, 4, 2, [6, 1], [6, 40]),  # whole prompt; one decode-like row
    (2, 2, 128, 8, 5, 7, F32, 8, 4, [7, 2], [23, 9]),
    (1, 8, 64, 32, 2, 3, F32, 1, 2, [3], [35]),
    (1, 16, 64, 8, 3, 4, F32, 2, 3, [4, 3], [17, 24]),
    (2, 2, 64, 16, 3, 5, BF16, 4, 2, [5, 4], [45, 4]),
    (1, 3, 64, 8, 4, 4, F32, 2, 2, [4, 2], [11, 30]),  # group 3: rows padded to 4
]


def _make_inputs(seed: int, kv_heads: int, group: int, head_dim: int, page_size: int,
                 max_blocks: int, t: int, dtype: Any, q_lens: list[int],
                 lengths: list[int]) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    num_pages = batch * max_blocks + 2
    owned = rng.permutation(num_pages)[:batch * max_blocks].reshape(batch, max_blocks)
    tables = owned.copy()
    for b, length in enumerate(lengths):
        for col in range(-(-length // page_size), max_blocks):
            other = owned[(b + 1) % batch, rng.integers(max_blocks)] if batch > 1 else 0
            tables[b, col] = (other, -1, num_pages + 1)[rng.integers(3)]
    q = rng.standard_normal((batch, t, kv_heads * group, head_dim)) * 2.0
    k = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    v = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(tables, jnp.int32), jnp.asarray(q_lens, jnp.int32),
            jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_references(case: tuple[Any, ...]) -> None:
    *shape, dtype, block_q, pages_per_block, q_lens, lengths = case
    args = _make_inputs(sum(lengths) + 7, *shape, dtype, q_lens, lengths)
    q, k, v, tables, q_lens_a, lengths_a = args
    out = paged_prefill_attention(*args, block_q=block_q, pages_per_block=pages_per_block,
                                  interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    got = np.asarray(out, np.float32)
    assert not np.isnan(got).any()
    tol = TOL[dtype]
    want = paged_prefill_attention_reference(*args)
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=tol, rtol=tol)
    tok = jnp.arange(q.shape[1])[None, :]
    q_pos = jnp.where(tok < q_lens_a[:, None], (lengths_a - q_lens_a)[:, None] + tok, -1)
    kvjax_ref = _kvjax_reference(q, k, v, tables, q_pos)
    np.testing.assert_allclose(got, np.asarray(kvjax_ref, np.float32), atol=tol, rtol=tol)
    assert not got[np.asarray(q_pos) < 0].any()  # padding rows are zeros


@pytest.mark.parametrize(("change", "message"), [
    ({"q_lens": [5, 9]}, "q_lens must lie"),  # > T
    ({"q_lens": [5, 6]}, "q_lens must lie"),  # > lengths
    ({"q_lens": [5]}, "q_lens must have shape"),
    ({"lengths": [6, 99]}, "lengths must lie"),
    ({"block_q": 3}, "block_q must be a power of two"),
    ({"pages_per_block": 0}, "pages_per_block must be"),
])
def test_bad_arguments_raise(change: dict[str, Any], message: str) -> None:
    q, k, v, tables, q_lens, lengths = _make_inputs(0, 1, 2, 64, 8, 4, 6, F32, [5, 4], [9, 5])
    kwargs: dict[str, Any] = {"q": q, "k_pages": k, "v_pages": v, "block_tables": tables,
                              "q_lens": q_lens, "lengths": lengths, "block_q": 2}
    for key, value in change.items():
        kwargs[key] = jnp.asarray(value, jnp.int32) if isinstance(value, list) else value
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**kwargs, interpret=True)


def test_rank_check() -> None:
    q, k, v, tables, q_lens, lengths = _make_inputs(1, 1, 2, 64, 8, 4, 6, F32, [5, 4], [9, 5])
    with pytest.raises(ValueError, match="q must have rank 4"):
        paged_prefill_attention(q[:, 0], k, v, tables, q_lens, lengths, interpret=True)


def test_layer_of_stacked_pool_read_in_place() -> None:
    """``layer=l`` on a stacked [L, P, S, K, D] pool equals the kernel on pool[l]."""
    q, k, v, tables, q_lens, lengths = _make_inputs(2, 2, 2, 64, 8, 4, 6, F32, [5, 4], [9, 30])
    rng = np.random.default_rng(5)
    k_stack = jnp.stack([k, jnp.asarray(rng.standard_normal(k.shape), F32), k * 2])
    v_stack = jnp.stack([v, v - 1, jnp.asarray(rng.standard_normal(v.shape), F32)])
    for layer in range(3):
        stacked = paged_prefill_attention(q, k_stack, v_stack, tables, q_lens, lengths,
                                          block_q=4, layer=layer, interpret=True)
        single = paged_prefill_attention(q, k_stack[layer], v_stack[layer], tables, q_lens,
                                         lengths, block_q=4, interpret=True)
        np.testing.assert_allclose(np.asarray(stacked), np.asarray(single), rtol=1e-6,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="layer must be an int in"):
        paged_prefill_attention(q, k_stack, v_stack, tables, q_lens, lengths, layer=3,
                                interpret=True)


def test_lowers_for_gpu_through_triton() -> None:
    """Lowered for CUDA (no GPU needed) the kernel takes Pallas's Triton path: the default
    Mosaic GPU lowering would not fit the whole-pool blocks in shared memory."""
    q, k, v, tables, q_lens, lengths = _make_inputs(3, 8, 4, 128, 16, 8, 32, BF16, [32, 5],
                                                    [100, 40])
    run = jax.jit(lambda *a: paged_prefill_attention(*a, layer=1))
    text = run.trace(q, jnp.stack([k, k]), jnp.stack([v, v]), tables, q_lens,
                     lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower()
