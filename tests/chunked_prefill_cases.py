"""Inputs and checks shared by the chunked-prefill kernel tests (Pallas and Triton)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import paged_attention_reference
from pallas_kernels.chunked_prefill import paged_prefill_attention_reference

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


def make_inputs(seed: int, kv_heads: int, group: int, head_dim: int, page_size: int,
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



def check_output(args: tuple[jax.Array, ...], out: jax.Array) -> None:
    """``out`` of a kernel on ``args`` (from ``make_inputs``) equals both references
    within the dtype's tolerance, has no NaN, and is zero on padding rows."""
    q, k, v, tables, q_lens, lengths = args
    assert out.shape == q.shape and out.dtype == q.dtype
    got = np.asarray(out, np.float32)
    assert not np.isnan(got).any()
    tol = TOL[F32] if q.dtype == F32 else TOL[BF16]
    want = paged_prefill_attention_reference(*args)
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=tol, rtol=tol)
    tok = jnp.arange(q.shape[1])[None, :]
    q_pos = jnp.where(tok < q_lens[:, None], (lengths - q_lens)[:, None] + tok, -1)
    kvjax_ref = _kvjax_reference(q, k, v, tables, q_pos)
    np.testing.assert_allclose(got, np.asarray(kvjax_ref, np.float32), atol=tol, rtol=tol)
    assert not got[np.asarray(q_pos) < 0].any()  # padding rows are zeros


def random_case(seed: int) -> tuple[Any, ...]:
    """A random case in the layout of ``CASES``: GQA 1..16, head dims 64/128, pages
    8..64, fp32/bf16, chunks of 0..T tokens over histories of any length."""
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 4))
    kv_heads = int(rng.choice([1, 2]))
    group = int(rng.choice([1, 2, 3, 4, 7, 8, 16]))
    head_dim = int(rng.choice([64, 128]))
    page_size = int(rng.choice([8, 16, 32, 64]))
    max_blocks = int(rng.integers(1, max(2, 160 // page_size) + 1))
    t = int(rng.integers(1, 40))
    dtype = (F32, BF16)[int(rng.integers(2))]
    capacity = max_blocks * page_size
    lengths = [int(x) for x in rng.integers(0, capacity + 1, batch)]
    q_lens = [int(rng.integers(0, min(t, n) + 1)) for n in lengths]
    block_q = int(rng.choice([1, 2, 4, 8, 16]))
    return (kv_heads, group, head_dim, page_size, max_blocks, t, dtype, block_q, q_lens,
            lengths)


# (change to the good arguments, expected error): shared by both kernels' tests
BAD_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"q_lens": [5, 9]}, "q_lens must lie"),  # > T
    ({"q_lens": [5, 6]}, "q_lens must lie"),  # > lengths
    ({"q_lens": [5]}, "q_lens must have shape"),
    ({"lengths": [6, 99]}, "lengths must lie"),
    ({"block_q": 3}, "block_q must be a power of two"),
]


def prefill_arguments(change: dict[str, Any]) -> dict[str, Any]:
    """Good keyword arguments (F32, GQA 2, T = 6) with ``change`` applied (lists become
    int32 arrays)."""
    q, k, v, tables, q_lens, lengths = make_inputs(0, 1, 2, 64, 8, 4, 6, F32, [5, 4], [9, 5])
    kwargs: dict[str, Any] = {"q": q, "k_pages": k, "v_pages": v, "block_tables": tables,
                              "q_lens": q_lens, "lengths": lengths, "block_q": 2}
    for key, value in change.items():
        kwargs[key] = jnp.asarray(value, jnp.int32) if isinstance(value, list) else value
    return kwargs
