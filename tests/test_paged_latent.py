"""The paged MLA latent cache against the dense latent cache."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.analysis.sizing import kv_bytes_per_token
from kvjax.analysis.spec import ArchSpec
from kvjax.cache import LatentCache
from kvjax.cache.paged_latent import PagedLatentCache
from kvjax.mla_config import MLAConfig
from kvjax.models.mla import MLADecoder

L, W = 2, 12


def _tables(rng: np.random.Generator, budgets: list[int], page_size: int, max_blocks: int,
            num_pages: int) -> np.ndarray:
    """Each sequence's blocks from a random permutation of the pool; the rest of a row
    names a page another sequence owns, which must never be read or written."""
    perm = rng.permutation(num_pages)
    tables = np.full((len(budgets), max_blocks), -1, np.int32)
    used = 0
    for b, n in enumerate(budgets):
        need = math.ceil(n / page_size)
        tables[b, :need] = perm[used:used + need]
        used += need
    for b in range(len(budgets)):
        row = tables[b]
        row[row < 0] = tables[(b + 1) % len(budgets), 0]
    return tables


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_latent_reads_what_dense_reads(page_size: int) -> None:
    rng = np.random.default_rng(page_size)
    lengths, width, max_len = [5, 13, 1], 16, 16
    budgets = [n + 1 for n in lengths]
    max_blocks = math.ceil(max_len / page_size)
    num_pages = sum(math.ceil(n / page_size) for n in budgets) + 2
    tables = _tables(rng, budgets, page_size, max_blocks, num_pages)
    paged = PagedLatentCache.init(L, num_pages, page_size, W, jnp.float32, jnp.asarray(tables))
    dense = LatentCache.init(L, len(lengths), max_len, W, jnp.float32)

    @jax.jit
    def step(paged: PagedLatentCache, dense: LatentCache, rows: jax.Array,
             pos: jax.Array) -> tuple[Any, ...]:
        reads = []
        for layer in range(L):  # layer l stores rows * (l + 1)
            pr, pk, paged = paged.update_and_read(layer, rows * (layer + 1), pos)
            dr, dk, dense = dense.update_and_read(layer, rows * (layer + 1), pos)
            reads.append((pr, pk, dr, dk))
        return reads, paged.advance(pos), dense.advance(pos)

    col = np.arange(width)[None]
    lens = np.asarray(lengths)[:, None]
    for pos in (np.where(col < lens, col, -1), np.where(col == 0, lens, -1)):
        rows = rng.standard_normal((len(lengths), width, W)).astype(np.float32)
        reads, paged, dense = step(paged, dense, jnp.asarray(rows), jnp.asarray(pos, np.int32))
        stored = np.asarray(dense.lengths)
        for pr, pk, dr, dk in reads:
            pr, pk, dr, dk = (np.asarray(x) for x in (pr, pk, dr, dk))
            for b, n in enumerate(stored):  # the slots any query of this step can see
                np.testing.assert_array_equal(pr[b, :n], dr[b, :n])
                np.testing.assert_array_equal(pk[b, :n], dk[b, :n])
        np.testing.assert_array_equal(paged.lengths, dense.lengths)
    np.testing.assert_array_equal(np.asarray(paged.lengths), np.array(lengths) + 1)
    # Pages no sequence owns were never written.
    owned = {int(tables[b, j]) for b, n in enumerate(budgets)
             for j in range(math.ceil(n / page_size))}
    spare = [p for p in range(num_pages) if p not in owned]
    assert not np.asarray(paged.pages)[:, spare].any()


def test_pool_bytes_are_the_sizing_figure() -> None:
    cfg = MLAConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=6,
                    v_head_dim=8)
    pool = PagedLatentCache.init(cfg.num_layers, 7, 16, cfg.latent_width, jnp.bfloat16,
                                 jnp.zeros((2, 3), jnp.int32))
    per_token = kv_bytes_per_token(ArchSpec.from_mla_config(cfg), "bf16")
    assert pool.pages.nbytes == per_token * 7 * 16 == (10 + 6) * 3 * 2 * 7 * 16


@pytest.mark.slow
def test_mla_decoder_over_paged_latent_equals_dense() -> None:
    """A prefill then two decode steps of an MLA model: same logits over either cache."""
    cfg = MLAConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, q_lora_rank=12)
    model = MLADecoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    pos = jnp.asarray(np.where(np.arange(8) < np.array([[8], [3]]), np.arange(8), -1),
                      jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens, pos, LatentCache.init(
        2, 2, 16, cfg.latent_width, jnp.float32))["params"]
    params = jax.tree.map(lambda p: p * 4.0, params)  # logits far from uniform
    tables = jnp.asarray([[3, 0, 5, 6], [1, 2, 4, 7]], jnp.int32)
    caches: list[Any] = [LatentCache.init(2, 2, 16, cfg.latent_width, jnp.float32),
                         PagedLatentCache.init(2, 8, 4, cfg.latent_width, jnp.float32, tables)]
    apply = jax.jit(model.apply)
    steps = [(tokens, pos), (tokens[:, :1], jnp.asarray([[8], [3]], jnp.int32)),
             (tokens[:, 1:2], jnp.asarray([[9], [4]], jnp.int32))]
    for toks, p in steps:
        (dense_logits, caches[0]), (paged_logits, caches[1]) = (
            apply({"params": params}, toks, p, c) for c in caches)
        np.testing.assert_allclose(np.asarray(paged_logits), np.asarray(dense_logits),
                                   rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(dense_logits)).max() > 0.5


def _mla_model() -> tuple[MLAConfig, MLADecoder, Any]:
    cfg = MLAConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, q_lora_rank=12)
    model = MLADecoder(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), tokens, jnp.arange(4)[None], LatentCache.init(
        2, 1, 8, cfg.latent_width, jnp.float32))["params"]
    return cfg, model, jax.tree.map(lambda p: p * 4.0, params)  # logits far from uniform


def test_kernel_backend_decode_steps_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """attention="pallas-interpret": the prompt goes through the gather path, each decode
    step through the MLA decode kernel (counted), and the logits equal the dense latent
    cache's, a padding row included."""
    from kvjax.cache import paged_latent as paged_latent_module

    calls = []
    kernel = paged_latent_module.mla_decode_attention

    def counting(*args: Any, **kwargs: Any) -> jax.Array:
        calls.append(kwargs["layer"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(paged_latent_module, "mla_decode_attention", counting)
    cfg, model, params = _mla_model()
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, 64, (3, 11)), jnp.int32)
    lens = np.array([[11], [5], [8]])
    pos = jnp.asarray(np.where(np.arange(11) < lens, np.arange(11), -1), jnp.int32)
    tables = jnp.asarray(rng.permutation(9).reshape(3, 3), jnp.int32)
    caches: list[Any] = [
        LatentCache.init(2, 3, 24, cfg.latent_width, jnp.float32),
        PagedLatentCache.init(2, 9, 8, cfg.latent_width, jnp.float32, tables,
                              attention="pallas-interpret")]
    steps = [(tokens, pos), (tokens[:, :1], jnp.asarray([[11], [5], [-1]], jnp.int32)),
             (tokens[:, 1:2], jnp.asarray([[12], [6], [8]], jnp.int32))]
    for i, (toks, p) in enumerate(steps):
        (dense_logits, caches[0]), (paged_logits, caches[1]) = (
            model.apply({"params": params}, toks, p, c) for c in caches)
        np.testing.assert_allclose(np.asarray(paged_logits), np.asarray(dense_logits),
                                   rtol=1e-5, atol=1e-5)
        assert calls == [0, 1] * i  # the prompt step does not use the kernel


def test_generate_with_mla_kernel_is_token_identical_to_dense() -> None:
    from kvjax.engine.generate import generate

    _, model, params = _mla_model()
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 64, n).tolist() for n in (1, 9, 16, 5)]
    limits = [6, 10, 4, 8]
    dense = generate(model, params, prompts, max_new_tokens=limits, cache="dense")
    kernel = generate(model, params, prompts, max_new_tokens=limits, cache="paged",
                      block_size=8, attention="pallas-interpret")
    assert kernel.tokens == dense.tokens and [len(t) for t in kernel.tokens] == limits


def test_latent_backend_errors() -> None:
    tables = jnp.zeros((1, 2), jnp.int32)
    for kwargs, match in (({"attention": "triton"}, "one of"),
                          ({"attention": "pallas", "page_size": 4}, "page_size"),
                          ({"attention": "pallas", "rope_key_heads": 2}, "one RoPE key head")):
        args = {"page_size": 8, **kwargs}
        with pytest.raises(ValueError, match=match):
            PagedLatentCache.init(1, 4, args.pop("page_size"), 12, jnp.float32, tables, **args)
