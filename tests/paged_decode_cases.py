"""Inputs and checks shared by the paged decode kernel tests (Pallas and Triton)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import paged_attention_reference
from pallas_kernels.paged_decode import paged_decode_attention_reference

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
TOL = {F32: 1e-5, BF16: 1e-2, F16: 1e-2}
_kvjax_reference = jax.jit(paged_attention_reference)

# (batch, kv_heads, group, head_dim, page_size, max_blocks, dtype, num_splits,
#  pages_per_block, lengths)
CASES = [
    (2, 2, 1, 64, 8, 4, F32, 1, 1, [0, 29]),
    (3, 1, 2, 64, 16, 3, F32, 2, 2, [1, 17, 48]),
    (2, 2, 4, 64, 8, 5, F32, 3, 1, [37, 8]),  # second sequence: two empty splits
    (1, 1, 8, 128, 8, 4, F32, 2, 4, [31]),
    (2, 1, 16, 64, 16, 2, F32, 3, 2, [32, 5]),  # 3 splits of 2 columns: one always empty
    (3, 2, 2, 128, 32, 2, F32, 1, 4, [64, 0, 33]),
    (2, 4, 1, 64, 8, 6, F32, 3, 2, [47, 3]),
    (1, 2, 4, 64, 32, 3, F32, 2, 1, [1]),
    (2, 1, 4, 64, 8, 6, F32, 2, 4, [13, 48]),
    (2, 8, 1, 64, 16, 2, F32, 2, 1, [0, 0]),  # all sequences empty
    (3, 1, 8, 64, 8, 3, F32, 1, 2, [23, 9, 24]),
    (2, 2, 2, 64, 16, 3, BF16, 2, 2, [41, 7]),
    (3, 1, 8, 128, 8, 4, BF16, 3, 1, [0, 1, 25]),
    (1, 1, 16, 64, 32, 2, BF16, 1, 2, [63]),
    (2, 2, 4, 64, 8, 4, F16, 2, 2, [19, 32]),
    (2, 1, 16, 128, 16, 3, F16, 3, 4, [45, 2]),
    (2, 2, 4, 64, 16, 3, F16, 1, 2, [0, 40]),  # one split (written normalised) and an empty row
]


def random_case(seed: int) -> tuple[Any, ...]:
    """A random case in the layout of ``CASES``: GQA 1..16 (powers of two and not), head
    dims 64/128, pages 8..128, any dtype, odd lengths, lengths 0 and 1, partial pages."""
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 5))
    kv_heads = int(rng.choice([1, 2, 4]))
    group = int(rng.choice([1, 2, 3, 4, 5, 8, 16]))
    head_dim = int(rng.choice([64, 128]))
    page_size = int(rng.choice([8, 16, 32, 64, 128]))
    max_blocks = int(rng.integers(1, max(2, 256 // page_size) + 1))
    dtype = (F32, BF16, F16)[int(rng.integers(3))]
    capacity = max_blocks * page_size
    lengths = [int(x) for x in rng.integers(0, capacity + 1, batch)]
    special = rng.permutation(batch)[:2]  # force the edge lengths into most cases
    lengths[special[0]] = int(rng.choice([0, 1, capacity]))
    if batch > 1:
        lengths[special[1]] = int(min(capacity, 2 * int(rng.integers(0, capacity // 2 + 1)) + 1))
    num_splits = int(rng.integers(1, min(max_blocks, 4) + 2))  # may exceed the columns
    pages_per_block = int(rng.choice([1, 2, 4, 8]))
    return (batch, kv_heads, group, head_dim, page_size, max_blocks, dtype, num_splits,
            pages_per_block, lengths)


def make_inputs(seed: int, batch: int, kv_heads: int, group: int, head_dim: int,
                page_size: int, max_blocks: int, dtype: Any, lengths: list[int],
                holes: bool = False) -> tuple[jax.Array, ...]:
    """Random q/pages; each sequence owns scrambled pages; unused table columns point
    at other sequences' pages, -1, or past the pool."""
    rng = np.random.default_rng(seed)
    num_pages = batch * max_blocks + 3
    owned = rng.permutation(num_pages)[:batch * max_blocks].reshape(batch, max_blocks)
    tables = owned.copy()
    for b, length in enumerate(lengths):
        for col in range(-(-length // page_size), max_blocks):
            choice = rng.integers(3)
            other = owned[(b + 1) % batch, rng.integers(max_blocks)] if batch > 1 else 0
            tables[b, col] = (other, -1, num_pages + 2)[choice]
    if holes:  # missing pages inside the sequence: never attended to
        tables[0, 0] = -1
        tables[-1, 1] = num_pages
    heads = kv_heads * group
    q = rng.standard_normal((batch, heads, head_dim)) * 2.0
    k = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    v = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32))


def numpy_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array) -> np.ndarray:
    """float64 NumPy decode attention, one sequence and head at a time: [B, H, D]."""
    qs, ks, vs = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    tables, lens = np.asarray(block_tables), np.asarray(lengths)
    num_pages, page_size, kv_heads, head_dim = ks.shape
    group = qs.shape[1] // kv_heads
    out = np.zeros_like(qs)
    for b in range(qs.shape[0]):
        pos = np.arange(lens[b])
        pages = tables[b, pos // page_size]
        real = (pages >= 0) & (pages < num_pages)
        pos, pages = pos[real], pages[real]
        for h in range(qs.shape[1]):
            if pos.size == 0:
                continue
            keys = ks[pages, pos % page_size, h // group]  # [n, D]
            scores = keys @ qs[b, h] / np.sqrt(head_dim)
            w = np.exp(scores - scores.max())
            out[b, h] = (w / w.sum()) @ vs[pages, pos % page_size, h // group]
    return out


def close(got: jax.Array | np.ndarray, want: jax.Array | np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)


def check_output(args: tuple[jax.Array, ...], out: jax.Array, tol: float) -> None:
    """``out`` = the float64 NumPy decode attention of ``args``; shape and dtype of q,
    no NaN, zero rows for empty sequences."""
    q, _, _, _, lengths = args
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any()
    close(out, numpy_reference(*args), tol)
    empty = np.asarray(lengths) == 0
    assert not np.asarray(out, np.float32)[empty].any()


def check_against_references(args: tuple[jax.Array, ...], out: jax.Array, tol: float) -> None:
    """``check_output`` and agreement with both jnp references."""
    q, k, v, tables, lengths = args
    check_output(args, out, tol)
    close(out, paged_decode_attention_reference(*args), tol)
    kvjax_ref = _kvjax_reference(q[:, None], k, v, tables, (lengths - 1)[:, None])
    close(out, kvjax_ref[:, 0], tol)


def good_arguments() -> dict[str, Any]:
    """Valid keyword arguments of a decode kernel call (fresh random data)."""
    q, k, v, tables, lengths = make_inputs(0, 2, 2, 2, 64, 8, 3, F32, [5, 24])
    return {"q": q, "k_pages": k, "v_pages": v, "block_tables": tables, "lengths": lengths}


# (id, mutation of good_arguments(), expected ValueError message)
BAD_ARGUMENTS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("q_rank", lambda a: a.update(q=a["q"][:, None]), "q must have rank 3"),
    ("pages_rank", lambda a: a.update(k_pages=a["k_pages"][0]), "k_pages must have rank 4"),
    ("tables_rank", lambda a: a.update(block_tables=a["block_tables"][0]),
     "block_tables must have rank 2"),
    ("kv_shape", lambda a: a.update(v_pages=a["v_pages"][:-1]), "differ in shape"),
    ("dtype", lambda a: a.update(q=a["q"].astype(BF16)), "share a dtype"),
    ("int_dtype", lambda a: a.update(q=a["q"].astype(jnp.int32),
                                     k_pages=a["k_pages"].astype(jnp.int32),
                                     v_pages=a["v_pages"].astype(jnp.int32)), "unsupported"),
    ("float_tables", lambda a: a.update(block_tables=a["block_tables"].astype(F32)),
     "block_tables must be integer"),
    ("batch", lambda a: a.update(lengths=a["lengths"][:1]), "batch mismatch"),
    ("head_dim_mismatch", lambda a: a.update(q=a["q"][..., :32]), "head_dim mismatch"),
    ("head_dim", lambda a: a.update(q=a["q"][..., :32], k_pages=a["k_pages"][..., :32],
                                    v_pages=a["v_pages"][..., :32]), "head_dim 32 unsupported"),
    ("page_size", lambda a: a.update(k_pages=a["k_pages"][:, :4], v_pages=a["v_pages"][:, :4]),
     "page_size 4 unsupported"),
    ("gqa", lambda a: a.update(q=a["q"][:, :3]), "not divisible"),
    ("too_long", lambda a: a.update(lengths=a["lengths"].at[0].set(25)), "lengths must lie"),
    ("negative", lambda a: a.update(lengths=a["lengths"].at[1].set(-1)), "lengths must lie"),
    ("splits", lambda a: a.update(num_splits=0), "num_splits must be"),
    ("block", lambda a: a.update(pages_per_block=0), "pages_per_block must be"),
]
