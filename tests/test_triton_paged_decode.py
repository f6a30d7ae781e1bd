"""Triton paged decode kernel, run by Triton's interpreter on CPU against the references
(``triton_testing``: jax-triton's call on the interpreter). Everything else —
argument checks, ``decode_launch``, the combine — is the code that runs on the GPU.
"""

from __future__ import annotations

# First: sets TRITON_INTERPRET before triton is imported; the autouse fixture.
from triton_testing import compile_for_h100, interpreted_jax_triton  # noqa: F401

# isort: split
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_decode_cases import (
    BAD_ARGUMENTS,
    BF16,
    CASES,
    F32,
    TOL,
    check_output,
    good_arguments,
    make_inputs,
    random_case,
)

from kvjax.cache import paged
from kvjax.engine.generate import generate
from kvjax.models import LoadedModel, load_checkpoint
from kvjax.models.tiny import build_tiny_checkpoint
from pallas_kernels import triton_paged_decode as tpd
from pallas_kernels.triton_decode_kernel import UPCAST_DOTS


def test_kernel_is_interpreted() -> None:
    assert UPCAST_DOTS, "TRITON_INTERPRET=1 must be set before triton is imported"


@pytest.mark.parametrize("prefetch_table", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_references(case: tuple[Any, ...], prefetch_table: bool) -> None:
    """The Pallas kernel's cases; a step of its pages_per_block pages (>= 16 tokens); the
    table read in each step or one step ahead."""
    *shape, dtype, num_splits, pages_per_block, lengths = case
    args = make_inputs(len(lengths) * 1000 + sum(lengths) + 1, *shape, dtype, lengths)
    block_tokens = max(16, pages_per_block * shape[4])
    out = tpd.triton_paged_decode_attention(*args, block_tokens=block_tokens,
                                            num_splits=num_splits,
                                            prefetch_table=prefetch_table)
    check_output(args, out, TOL[dtype])


def _random(seed: int) -> None:
    """A random case; steps of 16..256 tokens, so also parts of a page (pages up to 128);
    the table prefetched on odd seeds."""
    *shape, dtype, num_splits, _, lengths = random_case(seed)
    args = make_inputs(seed, *shape, dtype, lengths)
    block_tokens = int(np.random.default_rng(seed).choice([16, 32, 64, 128, 256]))
    out = tpd.triton_paged_decode_attention(*args, block_tokens=block_tokens,
                                            num_splits=num_splits,
                                            prefetch_table=bool(seed % 2))
    check_output(args, out, TOL[dtype])


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed: int) -> None:
    _random(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 106))
def test_random_shapes_sweep(seed: int) -> None:
    _random(seed)


def test_defaults_missing_pages_and_traced_lengths() -> None:
    """Default tunables; missing pages inside the length; lengths traced by an outer jit."""
    args = make_inputs(7, 2, 2, 2, 64, 8, 4, F32, [30, 27], holes=True)
    check_output(args, tpd.triton_paged_decode_attention(*args), 1e-5)
    run = jax.jit(lambda *a: tpd.triton_paged_decode_attention(*a, num_splits=2))
    check_output(args, run(*args), 1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_one_split_written_by_the_kernel(dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one split the kernel normalises and writes q's dtype itself: no combine runs,
    and the output (an empty row included) still equals the references."""
    def no_combine(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("combine_splits called for one split")

    monkeypatch.setattr(tpd, "combine_splits", no_combine)
    args = make_inputs(23, 3, 2, 4, 64, 16, 4, dtype, [0, 1, 61])
    out = tpd.triton_paged_decode_attention(*args, num_splits=1)
    assert out.dtype == dtype and out.shape == args[0].shape
    check_output(args, out, TOL[dtype])
    with pytest.raises(AssertionError, match="combine_splits called"):
        tpd.triton_paged_decode_attention(*args, num_splits=2)


def test_layer_of_stacked_pool_read_in_place() -> None:
    """``layer=l`` on a stacked [L, P, S, K, D] pool equals the kernel on pool[l]."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), BF16)
    pools = jnp.asarray(rng.standard_normal((2, 3, 5, 16, 2, 64)), BF16)  # k/v, L=3
    tables = jnp.asarray(rng.permutation(5)[:4].reshape(2, 2), jnp.int32)
    lengths = jnp.asarray([9, 32], jnp.int32)
    for layer in range(3):
        stacked = tpd.triton_paged_decode_attention(q, pools[0], pools[1], tables, lengths,
                                                    layer=layer)
        single = tpd.triton_paged_decode_attention(q, pools[0, layer], pools[1, layer],
                                                   tables, lengths)
        np.testing.assert_array_equal(np.asarray(stacked, np.float32),
                                      np.asarray(single, np.float32))
        check_output((q, pools[0, layer], pools[1, layer], tables, lengths),
                     stacked, 1e-2)
    with pytest.raises(ValueError, match="layer must be an int in"):
        tpd.triton_paged_decode_attention(q, pools[0], pools[1], tables, lengths, layer=3)


def _appended(args: tuple[jax.Array, ...], k_new: np.ndarray, v_new: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: the pools with each sequence's new token at position length - 1 (dropped for
    length 0, past the table or on a missing page), as the paged cache's scatter."""
    _, k, v, tables, lengths = (np.asarray(x) for x in args)
    k, v = k.copy(), v.copy()
    num_pages, page_size = k.shape[:2]
    for b, length in enumerate(lengths):
        pos = int(length) - 1
        if pos < 0 or pos // page_size >= tables.shape[1]:
            continue
        page = tables[b, pos // page_size]
        if 0 <= page < num_pages:
            k[page, pos % page_size], v[page, pos % page_size] = k_new[b], v_new[b]
    return k, v


def _check_append(seed: int, args: tuple[jax.Array, ...], **launch: Any) -> None:
    """The fused append equals the scatter then the float64 reference; the pools equal
    the scatter's bit for bit; the new token's old slot (NaN) is never read."""
    q, k, v, tables, lengths = args
    rng = np.random.default_rng(seed)
    shape = (q.shape[0], k.shape[2], q.shape[2])
    k_new = np.asarray(jnp.asarray(rng.standard_normal(shape), k.dtype))
    v_new = np.asarray(jnp.asarray(rng.standard_normal(shape), k.dtype))
    want_k, want_v = _appended(args, k_new, v_new)
    stale = want_k != np.asarray(k)  # the slots the append writes
    k_nan = jnp.asarray(np.where(stale, np.nan, np.asarray(k)), k.dtype)
    v_nan = jnp.asarray(np.where(stale, np.nan, np.asarray(v)), v.dtype)
    out, got_k, got_v = tpd.triton_paged_decode_append(
        q, jnp.asarray(k_new), jnp.asarray(v_new), k_nan, v_nan, tables, lengths, **launch)
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)
    appended = (q, jnp.asarray(want_k), jnp.asarray(want_v), tables, lengths)
    check_output(appended, out, 1e-5 if q.dtype == F32 else 1e-2)  # TOL by dtype


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_append_matches_scatter_then_attend(case: tuple[Any, ...]) -> None:
    """Every shared case (lengths 0 and 1, empty splits, one split, GQA 1-16, all dtypes)."""
    *shape, dtype, num_splits, pages_per_block, lengths = case
    seed = len(lengths) * 1000 + sum(lengths) + 2
    args = make_inputs(seed, *shape, dtype, lengths)
    _check_append(seed, args, block_tokens=max(16, pages_per_block * shape[4]),
                  num_splits=num_splits)


def _random_append(seed: int) -> None:
    """A random case; the new token at a split's first, last or any position."""
    *shape, dtype, num_splits, _, lengths = random_case(100 + seed)
    args = make_inputs(seed, *shape, dtype, lengths)
    _check_append(seed, args, block_tokens=int(np.random.default_rng(seed).choice([16, 64])),
                  num_splits=num_splits, prefetch_table=bool(seed % 2))


@pytest.mark.parametrize("seed", range(4))
def test_append_random_shapes(seed: int) -> None:
    _random_append(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 64))
def test_append_random_shapes_sweep(seed: int) -> None:
    _random_append(seed)


def test_append_missing_page_and_stacked_layer() -> None:
    """A new token on a missing page is neither stored nor attended; layer l of a stacked
    pool is written in place and the other layers are untouched."""
    args = make_inputs(31, 2, 2, 2, 64, 8, 4, F32, [5, 17], holes=True)  # row 0: page -1
    _check_append(31, args, num_splits=2)
    q, k, v, tables, lengths = args
    rng = np.random.default_rng(3)
    k_new = jnp.asarray(rng.standard_normal((2, 2, 64)), F32)
    v_new = jnp.asarray(rng.standard_normal((2, 2, 64)), F32)
    stacked_k, stacked_v = jnp.stack([k, k * 2, k * 3]), jnp.stack([v, v * 2, v * 3])
    out, new_k, new_v = tpd.triton_paged_decode_append(q, k_new, v_new, stacked_k, stacked_v,
                                                       tables, lengths, layer=1)
    one, one_k, one_v = tpd.triton_paged_decode_append(q, k_new, v_new, k * 2, v * 2, tables,
                                                       lengths)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(one))
    np.testing.assert_array_equal(np.asarray(new_k[1]), np.asarray(one_k))
    np.testing.assert_array_equal(np.asarray(new_v[1]), np.asarray(one_v))
    for layer in (0, 2):
        np.testing.assert_array_equal(np.asarray(new_k[layer]), np.asarray(stacked_k[layer]))
        np.testing.assert_array_equal(np.asarray(new_v[layer]), np.asarray(stacked_v[layer]))


def test_append_checks_new_token_shape_and_dtype() -> None:
    q, k, v, tables, lengths = make_inputs(0, 2, 2, 2, 64, 8, 3, F32, [5, 24])
    good = jnp.zeros((2, 2, 64), F32)
    for bad in (jnp.zeros((2, 4, 64), F32), jnp.zeros((2, 2, 64), BF16)):
        with pytest.raises(ValueError, match="k_new must be"):
            tpd.triton_paged_decode_append(q, bad, good, k, v, tables, lengths)
        with pytest.raises(ValueError, match="v_new must be"):
            tpd.triton_paged_decode_append(q, good, bad, k, v, tables, lengths)


def _head_major(pages: jax.Array) -> jax.Array:
    """[P, S, K, D] -> [P, K, S, D] (the same page ids, one S * D run per KV head)."""
    return jnp.swapaxes(pages, -3, -2)


@pytest.mark.parametrize("case", CASES[::2], ids=[f"case{i}" for i in range(0, len(CASES), 2)])
def test_head_major_pages_equal_token_major(case: tuple[Any, ...]) -> None:
    """The same pools stored head-major give the token-major kernel's output bit for bit,
    in the plain and the append kernel (whose written pools are the same pages)."""
    *shape, dtype, num_splits, pages_per_block, lengths = case
    args = make_inputs(sum(lengths) + 5, *shape, dtype, lengths)
    q, k, v, tables, lens = args
    kw: dict[str, Any] = {"block_tokens": max(16, pages_per_block * shape[4]),
                          "num_splits": num_splits}
    want = tpd.triton_paged_decode_attention(*args, **kw)
    got = tpd.triton_paged_decode_attention(q, _head_major(k), _head_major(v), tables, lens,
                                            page_layout="head-major", **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    rng = np.random.default_rng(1)
    new = [jnp.asarray(rng.standard_normal((q.shape[0], k.shape[2], q.shape[2])), dtype)
           for _ in range(2)]
    out_t, k_t, v_t = tpd.triton_paged_decode_append(q, *new, k, v, tables, lens, **kw)
    out_h, k_h, v_h = tpd.triton_paged_decode_append(q, *new, _head_major(k), _head_major(v),
                                                     tables, lens, page_layout="head-major",
                                                     **kw)
    np.testing.assert_array_equal(np.asarray(out_h, np.float32), np.asarray(out_t, np.float32))
    np.testing.assert_array_equal(np.asarray(k_h), np.asarray(_head_major(k_t)))
    np.testing.assert_array_equal(np.asarray(v_h), np.asarray(_head_major(v_t)))


def test_head_major_stacked_layer_and_checks() -> None:
    """Layer l of a stacked head-major pool; an unknown layout and a head-major pool whose
    head_dim disagrees with q are rejected before launching."""
    q, k, v, tables, lengths = make_inputs(9, 2, 2, 4, 64, 16, 3, BF16, [20, 41])
    stacked = [jnp.stack([_head_major(x) * (i + 1) for i in range(3)]) for x in (k, v)]
    got = tpd.triton_paged_decode_attention(q, *stacked, tables, lengths, layer=2,
                                            page_layout="head-major")
    want = tpd.triton_paged_decode_attention(q, k * 3, v * 3, tables, lengths)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="page_layout must be one of"):
        tpd.triton_paged_decode_attention(q, k, v, tables, lengths, page_layout="kv-major")
    with pytest.raises(ValueError, match="head_dim mismatch"):
        tpd.triton_paged_decode_attention(q, k[..., :32], v[..., :32], tables, lengths,
                                          page_layout="head-major")


SHARED_BAD = [b for b in BAD_ARGUMENTS if b[0] != "block"]  # no pages_per_block here


@pytest.mark.parametrize(("mutate", "message"), [b[1:] for b in SHARED_BAD],
                         ids=[b[0] for b in SHARED_BAD])
def test_shared_argument_checks(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    kwargs = good_arguments()
    mutate(kwargs)
    with pytest.raises(ValueError, match=message):
        tpd.triton_paged_decode_attention(**kwargs)


@pytest.mark.parametrize(("option", "message"), [
    ({"block_tokens": 48}, "power of two >= 16"),
    ({"block_tokens": 8}, "power of two >= 16"),
    ({"num_warps": 3}, "num_warps must be one of"),
    ({"num_stages": 0}, "num_stages must be"),
])
def test_triton_launch_settings_checked(option: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tpd.triton_paged_decode_attention(**good_arguments(), **option)


def test_decode_launch() -> None:
    """Grid, constexprs and scalars of one launch; steps no longer than a split."""
    launch = tpd.decode_launch((4, 32, 128), (3, 100, 16, 8, 128), 64, jnp.bfloat16, layer=2,
                               block_tokens=None, num_splits=None, num_warps=4, num_stages=4)
    meta = dict(launch.meta)
    assert launch.grid == (4, 8, 8)  # 32 programs -> 8 splits (auto, at most 8)
    assert launch.scalars == (2, 100) and meta["LAYER_STRIDE"] == 100 * 16 * 8 * 128
    assert (meta["GROUP"], meta["ROWS"], meta["BLOCK_TOKENS"]) == (4, 16, 32)
    assert meta["PREFETCH_TABLE"] is True and meta["HEAD_MAJOR"] is False
    assert meta["DOT_PRECISION"] == "tf32" and meta["SCALE"] == 128 ** -0.5
    assert launch.partial_shapes == ((4, 8, 8, 4, 128), (4, 8, 8, 4), (4, 8, 8, 4))
    small = dict(tpd.decode_launch((1, 2, 64), (9, 8, 1, 64), 5, jnp.float32, layer=None,
                                   block_tokens=256, num_splits=2, num_warps=4,
                                   num_stages=2).meta)
    # 3 columns of 8 tokens per split: steps of 256 tokens cut to 32
    assert (small["BLOCK_TOKENS"], small["ROWS"]) == (32, 16)
    assert small["DOT_PRECISION"] == "ieee"


def test_splits_share_the_rows_steps_whatever_the_table_width() -> None:
    """Each row's steps are shared evenly by the splits: the same partials (o, m, den)
    from a table 4x wider (its extra columns missing pages), and a row of ``n`` steps
    over ``S`` splits fills ``ceil(n / ceil(n / S))`` of them."""
    from pallas_kernels.triton_decode_kernel import paged_decode_kernel
    from pallas_kernels.triton_launch import triton_call

    lengths, splits, step = [0, 1, 33, 95, 96, 17], 4, 16
    q, k, v, tables, lens = make_inputs(7, len(lengths), 2, 3, 64, 16, 6, F32, lengths)
    wide = jnp.concatenate([tables, jnp.full((len(lengths), 18), -1, jnp.int32)], axis=1)
    parts = []
    for t in (tables, wide):
        launch = tpd._checked_launch(q, k, v, t, lens, page_layout="token-major", layer=None,
                                     block_tokens=step, num_splits=splits, num_warps=4,
                                     num_stages=2, prefetch_table=True)
        parts.append(triton_call(q, k, v, t, lens, *launch.scalars, kernel=paged_decode_kernel,
                                 out_shape=tpd._out_shapes(launch, q.dtype), grid=launch.grid,
                                 num_warps=4, num_stages=2, name="split_sharing",
                                 **dict(launch.meta)))
    for narrow_part, wide_part in zip(*parts, strict=True):
        np.testing.assert_array_equal(np.asarray(narrow_part), np.asarray(wide_part))
    den = np.asarray(parts[0][2])  # [B, K, splits, G]
    for row, length in enumerate(lengths):
        n = -(-length // step)
        filled = 0 if n == 0 else -(-n // -(-n // splits))
        assert ((den[row] > 0).all(axis=(0, 2)) == (np.arange(splits) < filled)).all(), row
    check_output((q, k, v, wide, lens), tpd._merge(q, *parts[1], launch), TOL[F32])


def test_default_block_tokens_bounds_the_tile() -> None:
    for head_dim in (64, 128, 256):
        for itemsize in (2, 4):
            tokens = tpd.default_block_tokens(head_dim, itemsize)
            assert tokens & (tokens - 1) == 0 and 16 <= tokens <= 128
            assert (tokens * head_dim * itemsize <= tpd.MAX_TILE_BYTES
                    or tokens == tpd.MIN_BLOCK_TOKENS)
    assert tpd.default_block_tokens(128, 2) == 32  # the H100 measurement's choice


def _assert_fit_h100(configs: list[list[Any]]) -> None:
    for config, result in zip(configs, compile_for_h100(configs), strict=True):
        assert 0 < result["shared"] <= tpd.H100_SHARED_BYTES, (config, result)


def test_default_launches_compile_for_h100() -> None:
    """The benchmark's shape and the largest default tile compile for sm_90 and fit."""
    # batch, heads, kv_heads, head_dim, page_size, max_blocks, dtype, tokens, warps, stages
    _assert_fit_h100([[32, 32, 8, 128, 16, 256, "bfloat16", None, 4, 4],
                      [8, 32, 8, 256, 128, 32, "bfloat16", None, 4, 4],
                      [8, 32, 8, 128, 16, 256, "bfloat16", 128, 4, 4]])


def test_append_kernel_compiles_for_h100() -> None:
    """The decode-append kernel at the engine's shape (Qwen2.5-0.5B: 14 heads, 2 KV heads,
    head_dim 64, blocks of 16; one split and several) and the benchmark's, and the plain
    kernel on head-major pages, for sm_90."""
    _assert_fit_h100([[8, 14, 2, 64, 16, 33, "bfloat16", None, 4, 4, True],
                      [1, 14, 2, 64, 16, 4, "bfloat16", None, 4, 4, True],
                      [32, 32, 8, 128, 16, 256, "float16", None, 4, 4, True],
                      [32, 32, 8, 128, 16, 256, "bfloat16", None, 4, 4, False, True]])


@pytest.mark.slow
def test_every_default_launch_compiles_for_h100() -> None:
    _assert_fit_h100([[4, 4 * group, 4, head_dim, page, 2048 // page, dtype, None, 4, 4]
                      for dtype in ("bfloat16", "float16", "float32")
                      for head_dim in (64, 128, 256) for page in (8, 16, 32, 64, 128)
                      for group in (1, 8)])


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """head_dim 64 (the kernels' smallest), GQA 4:2, float32."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("wide"), family="qwen2",
                                 hidden_size=256, num_heads=4, num_kv_heads=2,
                                 intermediate_size=256, max_position_embeddings=256, seed=5,
                                 weight_std=0.15)
    return load_checkpoint(path)


@pytest.fixture
def triton_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged cache's "triton" backend allowed (as on a GPU) and any Pallas kernel call
    an error."""
    monkeypatch.setattr(paged, "triton_unavailable_reason", lambda: None)

    def no_pallas(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the triton backend called a Pallas kernel")

    monkeypatch.setattr(paged, "paged_prefill_attention", no_pallas)
    monkeypatch.setattr(paged, "paged_decode_attention", no_pallas)


@pytest.mark.usefixtures("triton_only")
def test_paged_cache_triton_backend_token_identical_to_dense(wide_heads: LoadedModel) -> None:
    """Greedy generation with ``attention="triton"`` (decode steps through the decode
    kernel, the prompt through the Triton chunked-prefill kernel, each layer of the
    stacked pool read in place; no Pallas) gives the dense cache's tokens."""
    lm = wide_heads
    rng = np.random.default_rng(13)
    prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (1, 19)]
    limits = [9, 6]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="dense")
    kernel = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="paged",
                      block_size=8, attention="triton")
    assert kernel.tokens == dense.tokens
    assert [len(t) for t in kernel.tokens] == limits


@pytest.mark.usefixtures("triton_only")
def test_engine_triton_backend_token_identical_to_dense(wide_heads: LoadedModel) -> None:
    """The serving engine under ``attention="triton"``: single decode steps and 3-step
    overlapped bursts through the decode-append kernel (K/V written by the kernel, pools
    threaded through the device loop), prompt chunks through the Triton prefill kernel,
    no Pallas; greedy tokens equal the dense cache's and the pool ends empty."""
    from kvjax.engine.engine import Engine

    lm = wide_heads
    rng = np.random.default_rng(17)
    prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (1, 19, 10)]
    limits = [9, 6, 8]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="dense")
    engine = Engine(lm.model, lm.params, num_blocks=16, block_size=8, max_batch=4,
                    prefill_chunk=8, decode_steps=3, overlap_bursts=True, attention="triton")
    out = engine.generate(prompts, max_new_tokens=limits)
    assert out.tokens == dense.tokens
    assert any(s.decode_steps == 3 for s in engine.step_metrics)
    assert engine.pool_stats().num_sequences == 0
