"""Tests for the paged KV cache (kvjax.cache.paged) and paged / forked generation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import DenseCache, PagedCache, copy_pages, with_block_tables
from kvjax.engine.generate import (
    CACHE_KINDS,
    GenerationOutput,
    generate,
    generate_forked,
    sample_keys,
)
from kvjax.engine.sampling import SamplingParams
from kvjax.models import load_checkpoint
from kvjax.models.tiny import build_tiny_checkpoint

L, H, K, D = 2, 4, 2, 8


# ------------------------------------------------------------- cache-level tests


def _scrambled_tables(rng: np.random.Generator, lengths: list[int], page_size: int,
                      max_blocks: int, num_pages: int, pad: str) -> np.ndarray:
    """Each sequence's real blocks drawn from a random permutation of the pool.

    Only the blocks a sequence needs are real; the rest of its row is -1 or (``pad ==
    "alias"``) a page owned by another sequence, which must never be read or written.
    """
    perm = rng.permutation(num_pages)
    tables = np.full((len(lengths), max_blocks), -1, np.int32)
    used = 0
    for b, n in enumerate(lengths):
        need = math.ceil(n / page_size)
        tables[b, :need] = perm[used:used + need]
        used += need
    if pad == "alias":
        owned = tables[tables >= 0]
        for b in range(len(lengths)):
            row = tables[b]
            foreign = owned[~np.isin(owned, row)]
            row[row < 0] = foreign[0] if foreign.size else 0
    return tables


def _steps(rng: np.random.Generator, prompt_lens: list[int], width: int
           ) -> list[tuple[np.ndarray, ...]]:
    """A right-padded prefill step, then two decode steps (sequence 1 stops after one).

    Every step has ``width`` columns (decode steps are padded with -1) so one compiled
    step serves all three.
    """
    b = len(prompt_lens)

    def qkv() -> tuple[np.ndarray, ...]:
        return (rng.standard_normal((b, width, H, D), np.float32),
                rng.standard_normal((b, width, K, D), np.float32),
                rng.standard_normal((b, width, K, D), np.float32))

    col = np.arange(width)[None, :]
    lens = np.asarray(prompt_lens)[:, None]
    prefill_pos = np.where(col < lens, col, -1).astype(np.int32)
    dec1 = np.where(col == 0, lens, -1).astype(np.int32)
    dec2 = np.where(col == 0, lens + 1, -1).astype(np.int32)
    dec2[1] = -1  # a finished sequence: padding, neither stored nor attended
    return [(*qkv(), prefill_pos), (*qkv(), dec1), (*qkv(), dec2)]


# Page sizes 1, 3 and 16 leave partial last pages; 40 exceeds every sequence's budget.
@pytest.mark.parametrize(("page_size", "pad"),
                         [(1, "minus1"), (3, "alias"), (16, "alias"), (40, "minus1")])
def test_paged_matches_dense(page_size: int, pad: str) -> None:
    rng = np.random.default_rng(page_size)
    prompt_lens = [5, 13, 1, 30]  # partial last pages for most page sizes
    width, max_len = 32, 40
    max_blocks = math.ceil(max_len / page_size)
    budgets = [n + 2 for n in prompt_lens]
    num_pages = sum(math.ceil(n / page_size) for n in budgets) + 3  # 3 pages never used
    tables = _scrambled_tables(rng, budgets, page_size, max_blocks, num_pages, pad)
    paged = PagedCache.init(L, num_pages, page_size, K, D, jnp.float32, jnp.asarray(tables))
    dense = DenseCache.init(L, len(prompt_lens), max_len, K, D, jnp.float32)

    @jax.jit
    def step(paged: PagedCache, dense: DenseCache, q: jax.Array, k: jax.Array, v: jax.Array,
             pos: jax.Array) -> tuple[Any, ...]:
        outs = []
        for layer in range(L):  # different data per layer: layer l uses k * (l + 1)
            po, paged = paged.update_and_attend(layer, q, k * (layer + 1), v - layer, pos)
            do, dense = dense.update_and_attend(layer, q, k * (layer + 1), v - layer, pos)
            outs.append((po, do))
        return outs, paged.advance(pos), dense.advance(pos)

    for q, k, v, pos in _steps(rng, prompt_lens, width):
        outs, paged, dense = step(paged, dense, q, k, v, pos)
        for po, do in outs:
            chex.assert_trees_all_close(po, do, rtol=1e-5, atol=1e-5)
            assert np.all(np.asarray(po)[pos < 0] == 0)
        np.testing.assert_array_equal(paged.lengths, dense.lengths)

    # Stored contents: every written position sits at its page/offset, and nothing else
    # in the pool was touched (never-used pages and unwritten slots are still zero).
    kp, dk = np.asarray(paged.k_pages), np.asarray(dense.k)
    expect = np.zeros_like(kp)
    for b, n in enumerate(np.asarray(dense.lengths)):
        for p in range(n):
            expect[:, tables[b, p // page_size], p % page_size] = dk[:, b, p]
    np.testing.assert_array_equal(kp, expect)
    np.testing.assert_array_equal(paged.lengths, [7, 14, 3, 32])  # seq 1 stopped early


def test_kernel_backend_matches_xla_on_chunks_and_decode() -> None:
    """"pallas-interpret" (chunked-prefill kernel for T > 1, decode kernel for T = 1, each
    layer read in place) gives the XLA reference's outputs: a prefill, a second chunk
    after it (prefix-hit suffix, decode-like rows of one token and idle rows among
    them), then a decode step."""
    rng = np.random.default_rng(3)
    heads, kv_heads, head_dim, page_size, max_blocks = 4, 2, 64, 8, 6
    prompt, chunk = [5, 13, 1], [7, 1, 0]  # second chunk: 7 tokens, 1 token, idle
    budgets = [p + c + 1 for p, c in zip(prompt, chunk, strict=True)]
    num_pages = sum(math.ceil(n / page_size) for n in budgets) + 2
    tables = jnp.asarray(_scrambled_tables(rng, budgets, page_size, max_blocks, num_pages,
                                           "alias"))
    caches = {a: PagedCache.init(L, num_pages, page_size, kv_heads, head_dim, jnp.float32,
                                 tables, attention=a) for a in ("xla", "pallas-interpret")}

    @jax.jit
    def step(cache: PagedCache, q: jax.Array, k: jax.Array, v: jax.Array,
             pos: jax.Array) -> tuple[list[jax.Array], PagedCache]:
        outs = []
        for layer in range(L):
            out, cache = cache.update_and_attend(layer, q, k * (layer + 1), v - layer, pos)
            outs.append(out)
        return outs, cache.advance(pos)

    col = np.arange(16)[None, :]
    first = np.asarray(prompt)[:, None]
    steps = [np.where(col < first, col, -1),
             np.where(col < np.asarray(chunk)[:, None], first + col, -1),
             (first + np.asarray(chunk)[:, None])[:, :1]]
    for pos in steps:
        b, t = pos.shape
        q = jnp.asarray(rng.standard_normal((b, t, heads, head_dim)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, head_dim)), jnp.float32)
                for _ in range(2))
        results = {a: step(c, q, k, v, jnp.asarray(pos, jnp.int32))
                   for a, c in caches.items()}
        caches = {a: r[1] for a, r in results.items()}
        for got, want in zip(results["pallas-interpret"][0], results["xla"][0], strict=True):
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
            assert np.all(np.asarray(got)[pos < 0] == 0)
            assert np.abs(np.asarray(got)[pos >= 0]).sum() > 0


def test_out_of_table_positions_are_dropped() -> None:
    """Positions past a sequence's real blocks (-1 entries) write nothing anywhere."""
    tables = jnp.asarray([[2, -1], [0, 1]], jnp.int32)
    cache = PagedCache.init(1, 3, 2, K, D, jnp.float32, tables)
    k = jnp.ones((2, 4, K, D), jnp.float32)

    @jax.jit
    def write(pos: jax.Array) -> jax.Array:
        return cache.update_and_attend(0, jnp.ones((2, 4, H, D)), k, k, pos)[1].k_pages

    written = write(jnp.asarray([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(written)[0, :, :, 0, 0], [[1, 1], [1, 1], [1, 1]])
    # Block 1 of sequence 0 is -1, position 4 is past its 2-entry table: all dropped.
    assert not np.asarray(write(jnp.asarray([[2, 3, 4, -1], [-1] * 4], jnp.int32))).any()


def test_copy_pages_copies_all_layers_of_named_pages_only() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 8, 4, K, D)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    tables = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    cache = PagedCache(k_pages=jnp.asarray(k), v_pages=jnp.asarray(v), block_tables=tables,
                       lengths=jnp.asarray([5, 7], jnp.int32))
    src, dst = np.asarray([2, 5, 6]), np.asarray([7, 0, 5])  # 5 is read, then overwritten
    out = jax.jit(copy_pages)(cache, jnp.asarray(src), jnp.asarray(dst))
    ek, ev = k.copy(), v.copy()
    for s, d in zip(src, dst, strict=True):
        ek[:, d], ev[:, d] = k[:, s], v[:, s]
    np.testing.assert_array_equal(out.k_pages, ek)
    np.testing.assert_array_equal(out.v_pages, ev)
    untouched = [p for p in range(8) if p not in dst]
    np.testing.assert_array_equal(np.asarray(out.k_pages)[:, untouched], k[:, untouched])
    np.testing.assert_array_equal(out.block_tables, tables)
    np.testing.assert_array_equal(out.lengths, [5, 7])
    # No copies is the identity.
    none = copy_pages(cache, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32))
    np.testing.assert_array_equal(none.k_pages, k)
    with pytest.raises(AssertionError):
        copy_pages(cache, jnp.asarray([1, 2]), jnp.asarray([3]))


def test_with_block_tables() -> None:
    cache = PagedCache.init(1, 4, 2, K, D, jnp.float32, jnp.asarray([[0, 1]]),
                            jnp.asarray([3]))
    same = with_block_tables(cache, jnp.asarray([[2, 3]]))
    np.testing.assert_array_equal(same.block_tables, [[2, 3]])
    np.testing.assert_array_equal(same.lengths, [3])
    wider = with_block_tables(cache, jnp.asarray([[0, 1, 2], [0, 1, 3]]), jnp.asarray([3, 3]))
    assert wider.block_tables.shape == (2, 3) and wider.k_pages is cache.k_pages
    with pytest.raises(AssertionError):  # batch changes but no lengths given
        with_block_tables(cache, jnp.asarray([[0, 1], [2, 3]]))


# -------------------------------------------------------------- generation tests

PROMPTS = [[5, 6, 7], list(range(3, 23)), [9] * 11, [4]]  # lengths 3, 20, 11, 1
LIMITS = [8, 6, 8, 5]
FORK_PROMPT = PROMPTS[1]  # 20 tokens
FORK_NEW = LIMITS[1]  # so the batched dense run is a reference for forked greedy samples


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
    loaded = load_checkpoint(path)
    assert jnp.dtype(loaded.model.dtype) == jnp.float32
    return loaded


@pytest.fixture(scope="module")
def dense_out(lm: Any) -> GenerationOutput:
    return generate(lm.model, lm.params, PROMPTS, max_new_tokens=LIMITS, cache="dense")


def test_paged_is_a_cache_kind() -> None:
    assert "paged" in CACHE_KINDS


@pytest.mark.parametrize("block_size", [1, 16, 24])  # 24 > the longest prompt (20)
def test_generate_paged_equals_dense(lm: Any, dense_out: GenerationOutput,
                                     block_size: int) -> None:
    out = generate(lm.model, lm.params, PROMPTS, max_new_tokens=LIMITS, cache="paged",
                   block_size=block_size)
    assert [len(t) for t in dense_out.tokens] == LIMITS
    assert out.tokens == dense_out.tokens
    assert out.finish_reasons == dense_out.finish_reasons


def test_forked_greedy_shares_prompt_blocks(lm: Any, dense_out: GenerationOutput) -> None:
    n, bs = 3, 8
    res = generate_forked(lm.model, lm.params, FORK_PROMPT, n, max_new_tokens=FORK_NEW,
                          block_size=bs)
    plen = len(FORK_PROMPT)
    full, per_seq = plen // bs, math.ceil((plen + FORK_NEW) / bs)  # 2 full, 4 per sample
    assert (full, per_seq) == (2, 4)

    # Prefilled once: only the prompt's blocks are in use before forking.
    assert res.prompt_stats.used_blocks == math.ceil(plen / bs)
    assert res.prompt_stats.num_sequences == 1
    # After the fork: the full prompt blocks appear once, held by all n children.
    tables = res.block_tables
    assert tables.shape == (n, per_seq) and (tables >= 0).all()
    shared = tables[0, :full]
    assert (tables[:, :full] == shared).all()
    assert [int(res.refcounts[p]) for p in shared] == [n] * full
    tails = tables[:, full:]
    assert len(set(tails.ravel().tolist())) == tails.size  # private, distinct tails
    assert all(res.refcounts[p] == 1 for p in tails.ravel())
    assert res.decode_stats.shared_blocks == full
    assert res.decode_stats.used_blocks == full + n * (per_seq - full)
    assert res.decode_stats.used_blocks < n * per_seq  # less than n separate copies
    assert res.decode_stats.free_blocks == 0  # the default pool is exactly enough
    # Copy-on-write of the shared partial block: every child but one got a private copy.
    partial = {int(p) for p in tables[:, full]}
    assert len(res.copies) == n - 1
    assert {s for s, _ in res.copies} == partial - {d for _, d in res.copies}
    assert {d for _, d in res.copies} <= partial

    ref = dense_out.tokens[1]
    assert len(ref) == FORK_NEW
    assert res.output.tokens == [ref] * n
    assert res.output.finish_reasons == ["length"] * n


def test_forked_no_copy_when_prompt_fills_its_blocks(lm: Any) -> None:
    res = generate_forked(lm.model, lm.params, FORK_PROMPT, 2, max_new_tokens=0,
                          block_size=4)  # 20 % 4 == 0
    assert res.copies == []
    assert res.decode_stats.shared_blocks == 5
    assert res.output.tokens == [[], []]


def test_forked_sampling(lm: Any) -> None:
    n, seed, bs = 3, 7, 8
    sp = SamplingParams(temperature=1.0)
    res = generate_forked(lm.model, lm.params, FORK_PROMPT, n, max_new_tokens=FORK_NEW,
                          block_size=bs, sampling=sp, seed=seed)
    toks = res.output.tokens
    assert all(len(t) == FORK_NEW for t in toks)
    assert len({tuple(t) for t in toks}) == n  # different keys diverge
    # Each sample is reproduced by an independent paged run with its key: no fork, no
    # sharing, another block size, the samples in reverse order in the batch.
    batch = generate(lm.model, lm.params, [FORK_PROMPT] * n, max_new_tokens=FORK_NEW,
                     cache="paged", block_size=16, sampling=sp,
                     keys=sample_keys(seed, range(n - 1, -1, -1)))
    assert batch.tokens == toks[::-1]


def test_pool_too_small_is_a_clear_error(lm: Any) -> None:
    needed = sum(math.ceil((len(p) + n) / 16) for p, n in zip(PROMPTS, LIMITS, strict=True))
    with pytest.raises(ValueError, match=rf"pool too small.*need {needed} blocks.*num_blocks="):
        generate(lm.model, lm.params, PROMPTS, max_new_tokens=LIMITS, cache="paged",
                 block_size=16, num_blocks=needed - 1)
    with pytest.raises(ValueError, match=r"pool too small.*need 8 blocks"):
        generate_forked(lm.model, lm.params, FORK_PROMPT, 3, max_new_tokens=FORK_NEW,
                        block_size=8, num_blocks=7)
    with pytest.raises(ValueError, match="block_size"):
        generate(lm.model, lm.params, PROMPTS, max_new_tokens=2, cache="paged", block_size=0)
