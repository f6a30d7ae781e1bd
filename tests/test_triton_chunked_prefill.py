"""Triton chunked-prefill kernel, run by Triton's interpreter on CPU against both
references (``triton_testing``); argument checks and ``prefill_launch`` are the
code that runs on the GPU."""

from __future__ import annotations

# First: sets TRITON_INTERPRET before triton is imported; the autouse fixture.
from triton_testing import compile_for_h100, interpreted_jax_triton  # noqa: F401

# isort: split
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
    random_case,
)

from pallas_kernels import triton_chunked_prefill as tcp
from pallas_kernels.chunked_prefill import paged_prefill_attention
from pallas_kernels.triton_paged_decode import H100_SHARED_BYTES


@pytest.mark.parametrize(("prefetch_table", "split_diagonal"),
                         [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_references(case: tuple[Any, ...], prefetch_table: bool,
                                   split_diagonal: bool) -> None:
    """The Pallas kernel's cases; steps of 16 tokens (parts of pages or several); the
    table read in each step or one step ahead; one causal loop or the unmasked steps
    apart from the diagonal ones."""
    *shape, dtype, block_q, _, q_lens, lengths = case
    args = make_inputs(sum(lengths) + 7, *shape, dtype, q_lens, lengths)
    check_output(args, tcp.triton_paged_prefill_attention(*args, block_q=block_q,
                                                          block_tokens=16,
                                                          prefetch_table=prefetch_table,
                                                          split_diagonal=split_diagonal))


@pytest.mark.parametrize("split_diagonal", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_growing_scores(split_diagonal: bool, dtype: Any) -> None:
    """Keys that grow along the sequence (scores up to about 40, in log2 units inside the
    kernel) move every row's running max at many steps of the walk; the rescaled output
    equals both references."""
    q, k, v, tables, q_lens, lengths = make_inputs(11, 2, 4, 64, 16, 6, 24, dtype,
                                                   [24, 17], [90, 60])
    num_pages, page = k.shape[:2]
    position = np.zeros((num_pages, page), np.float32)  # each pool row's position in its row
    for row in np.asarray(tables):
        for col, entry in enumerate(row):
            if 0 <= entry < num_pages:
                position[entry] = col * page + np.arange(page)
    grow = jnp.asarray(1.0 + position / 12.0)[:, :, None, None]
    k = (k.astype(jnp.float32) * grow).astype(dtype)
    args = (q, k, v, tables, q_lens, lengths)
    check_output(args, tcp.triton_paged_prefill_attention(
        *args, block_q=4, block_tokens=16, split_diagonal=split_diagonal))


def _random(seed: int) -> None:
    """A random case; the table prefetched on odd seeds, the diagonal split on seeds
    2, 3, 6, 7, ..."""
    *shape, dtype, block_q, q_lens, lengths = random_case(seed)
    args = make_inputs(seed, *shape, dtype, q_lens, lengths)
    block_tokens = int(np.random.default_rng(seed).choice([16, 32, 64]))
    check_output(args, tcp.triton_paged_prefill_attention(
        *args, block_q=block_q, block_tokens=block_tokens, prefetch_table=bool(seed % 2),
        split_diagonal=bool(seed // 2 % 2)))


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed: int) -> None:
    _random(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 66))
def test_random_shapes_sweep(seed: int) -> None:
    _random(seed)


def test_defaults_equal_pallas_kernel_and_traced_lengths() -> None:
    """Default tiles; the same output as the Pallas kernel; lengths traced by an outer jit."""
    args = make_inputs(3, 2, 7, 64, 16, 6, 21, F32, [21, 0, 9], [70, 12, 9])
    out = tcp.triton_paged_prefill_attention(*args)
    check_output(args, out)
    pallas = paged_prefill_attention(*args, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(pallas), rtol=1e-5, atol=1e-5)
    check_output(args, jax.jit(tcp.triton_paged_prefill_attention)(*args))


def test_layer_of_stacked_pool_read_in_place() -> None:
    """``layer=l`` on a stacked [L, P, S, K, D] pool equals the kernel on pool[l]."""
    q, k, v, tables, q_lens, lengths = make_inputs(2, 2, 2, 64, 8, 4, 6, BF16, [5, 4],
                                                   [9, 30])
    rng = np.random.default_rng(5)
    k_stack = jnp.stack([k, jnp.asarray(rng.standard_normal(k.shape), BF16), k * 2])
    v_stack = jnp.stack([v, v - 1, jnp.asarray(rng.standard_normal(v.shape), BF16)])
    for layer in range(3):
        stacked = tcp.triton_paged_prefill_attention(q, k_stack, v_stack, tables, q_lens,
                                                     lengths, layer=layer)
        single = tcp.triton_paged_prefill_attention(q, k_stack[layer], v_stack[layer],
                                                    tables, q_lens, lengths)
        np.testing.assert_array_equal(np.asarray(stacked, np.float32),
                                      np.asarray(single, np.float32))
        check_output((q, k_stack[layer], v_stack[layer], tables, q_lens, lengths), stacked)
    with pytest.raises(ValueError, match="layer must be an int in"):
        tcp.triton_paged_prefill_attention(q, k_stack, v_stack, tables, q_lens, lengths,
                                           layer=3)


@pytest.mark.parametrize(("change", "message"), [
    *BAD_ARGUMENTS,
    ({"block_tokens": 8}, "block_tokens must be a power of two >= 16"),
    ({"num_warps": 3}, "num_warps must be one of"),
    ({"num_stages": 0}, "num_stages must be"),
])
def test_bad_arguments_raise(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tcp.triton_paged_prefill_attention(**prefill_arguments(change))


def test_prefill_launch() -> None:
    """Grid, tiles and constexprs: Qwen2.5-0.5B's GQA 7 (rows padded to 8), 64-row query
    tiles of 4 warps by default, at least 16 rows, at most T's tokens."""
    launch = tcp.prefill_launch((4, 100, 14, 64), (2, 500, 16, 2, 64), 40, jnp.bfloat16,
                                layer=1, block_q=None, block_tokens=None, num_warps=None,
                                num_stages=4)
    meta = dict(launch.meta)
    assert (meta["GROUP"], meta["GROUP_ROWS"], meta["BLOCK_Q"]) == (7, 8, 8)
    assert launch.grid == (4, 2, 13) and launch.scalars == (1, 500)
    assert launch.num_warps == 4 and launch.num_stages == 4
    wide = tcp.prefill_launch((4, 100, 14, 64), (2, 500, 16, 2, 64), 40, jnp.bfloat16,
                              layer=1, block_q=16, block_tokens=None, num_warps=None,
                              num_stages=2)
    assert wide.num_warps == 8  # a 128-row tile asked for: two warp groups
    assert meta["BLOCK_TOKENS"] == 64 and meta["DOT_PRECISION"] == "tf32"
    assert meta["SCALE"] == pytest.approx(64 ** -0.5 * tcp.LOG2E)  # log2 units: exp2
    assert meta["PREFETCH_TABLE"] is True and meta["SPLIT_DIAGONAL"] is True
    assert meta["LAYER_STRIDE"] == 500 * 16 * 2 * 64 and launch.out_shape == (4, 100, 14, 64)
    one = dict(tcp.prefill_launch((2, 1, 2, 128), (9, 8, 2, 128), 3, jnp.float32, layer=None,
                                  block_q=64, block_tokens=None, num_warps=4,
                                  num_stages=2).meta)
    assert (one["GROUP_ROWS"], one["BLOCK_Q"], one["BLOCK_TOKENS"]) == (1, 16, 32)
    assert one["DOT_PRECISION"] == "ieee"
    small = tcp.prefill_launch((2, 1, 2, 128), (9, 8, 2, 128), 3, jnp.float32, layer=None,
                               block_q=None, block_tokens=None, num_warps=None, num_stages=2)
    assert small.num_warps == 4  # a 16-row tile (one token): one warp group


def test_default_query_tile() -> None:
    """64 rows (tokens x padded group heads) for 16-bit head_dim up to 128, fewer for
    wider rows, never below 16; the measured 16-bit head_dim 128, GQA 4 tile is 16 tokens."""
    assert tcp.default_block_q(4, 128, 2) == 16
    assert tcp.default_block_q(8, 64, 2) == 8 and tcp.default_block_q(1, 64, 2) == 64
    assert tcp.default_block_q(1, 128, 4) == 32 and tcp.default_block_q(1, 256, 4) == 16
    assert tcp.default_block_q(16, 256, 4) == 1  # 16 rows: one mma tile
    assert tcp.default_num_warps(128) == 8 and tcp.default_num_warps(64) == 4


def test_default_block_tokens_bounds_the_tile() -> None:
    """Default steps: 16 to 64 tokens, the tile within ``STEP_TILE_BYTES`` unless at the
    16-token minimum; 64 for the measured 16-bit head_dim 128."""
    for head_dim in (64, 128, 256):
        for itemsize in (2, 4):
            tokens = tcp.default_block_tokens(head_dim, itemsize)
            assert 16 <= tokens <= 64 and tokens & (tokens - 1) == 0
            assert tokens == 16 or tokens * head_dim * itemsize <= tcp.STEP_TILE_BYTES
    assert tcp.default_block_tokens(128, 2) == 64
    assert tcp.default_block_tokens(256, 4) == 16


def test_default_launches_compile_for_h100() -> None:
    """Default launches compile for sm_90 and fit its shared memory: the benchmark's
    Qwen2.5-0.5B shape (GQA 7, head_dim 64), GQA 4 at head_dim 128, float32 at head_dim
    128 and the largest tile (float32, head_dim 256, MHA: 16 query rows); 128-row tiles
    of 64-token steps at 3 stages; and the former default, one causal loop of 16-token
    steps."""
    # batch, T, heads, kv_heads, head_dim, page, max_blocks, dtype, block_q, tokens, warps,
    # stages(, split_diagonal)
    stages = tcp.NUM_STAGES
    configs = [[4, 512, 14, 2, 64, 16, 256, "bfloat16", None, None, None, stages],
               [2, 128, 32, 8, 128, 16, 64, "bfloat16", None, None, None, stages],
               [2, 64, 8, 8, 256, 64, 16, "float32", None, None, None, stages],
               [2, 64, 8, 8, 128, 16, 16, "float32", None, None, None, stages],
               [2, 512, 32, 8, 128, 16, 64, "bfloat16", 32, 64, 8, 3, True],
               [2, 512, 32, 8, 128, 16, 64, "bfloat16", None, 16, 4, 4, False]]
    for config, result in zip(configs, compile_for_h100(configs, "prefill"), strict=True):
        assert 0 < result["shared"] <= H100_SHARED_BYTES, (config, result)
