"""Pallas chunked-prefill kernel (interpret mode) against both jnp references."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chunked_prefill_cases import (
    BAD_ARGUMENTS,
    BF16,
    CASES,
    F32,
    check_output,
    make_inputs,
    prefill_arguments,
)

from pallas_kernels.chunked_prefill import paged_prefill_attention


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_references(case: tuple[Any, ...]) -> None:
    *shape, dtype, block_q, pages_per_block, q_lens, lengths = case
    args = make_inputs(sum(lengths) + 7, *shape, dtype, q_lens, lengths)
    check_output(args, paged_prefill_attention(*args, block_q=block_q,
                                               pages_per_block=pages_per_block,
                                               interpret=True))


@pytest.mark.parametrize(("change", "message"), [
    *BAD_ARGUMENTS, ({"pages_per_block": 0}, "pages_per_block must be")])
def test_bad_arguments_raise(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**prefill_arguments(change), interpret=True)


def test_rank_check() -> None:
    q, k, v, tables, q_lens, lengths = make_inputs(1, 1, 2, 64, 8, 4, 6, F32, [5, 4], [9, 5])
    with pytest.raises(ValueError, match="q must have rank 4"):
        paged_prefill_attention(q[:, 0], k, v, tables, q_lens, lengths, interpret=True)


def test_layer_of_stacked_pool_read_in_place() -> None:
    """``layer=l`` on a stacked [L, P, S, K, D] pool equals the kernel on pool[l]."""
    q, k, v, tables, q_lens, lengths = make_inputs(2, 2, 2, 64, 8, 4, 6, F32, [5, 4], [9, 30])
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
    q, k, v, tables, q_lens, lengths = make_inputs(3, 8, 4, 128, 16, 8, 32, BF16, [32, 5],
                                                    [100, 40])
    run = jax.jit(lambda *a: paged_prefill_attention(*a, layer=1))
    text = run.trace(q, jnp.stack([k, k]), jnp.stack([v, v]), tables, q_lens,
                     lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower()
