"""Head sharing from MQA to MHA (n_kv_heads in {1, 2, n_heads}) in the dense and paged
caches: both hold exactly n_kv_heads K/V heads (never repeated) and attend as a float64
reference that repeats each K/V head for its group of query heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvjax.cache import DenseCache, PagedCache
from kvjax.engine.generate import generate
from kvjax.models import load_checkpoint
from kvjax.models.tiny import build_tiny_checkpoint

H, D, L, PAGE = 4, 8, 2, 4


def _ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
         k_pos: np.ndarray) -> np.ndarray:
    """float64 attention; query head h reads K/V head h // (H / K) via np.repeat."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    ok = (q_pos[:, None, :, None] >= 0) & (k_pos[:, None, None, :] >= 0) \
        & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    s = np.where(ok, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    e = np.where(ok, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("kv_heads", [1, 2, H])
def test_dense_and_paged_caches_share_heads(kv_heads: int) -> None:
    rng = np.random.default_rng(kv_heads)
    lengths, width, max_len = [6, 2, 9], 9, 12
    b = len(lengths)
    tables = rng.permutation(b * 3).reshape(b, 3).astype(np.int32)  # 3 pages of 4 each
    dense = DenseCache.init(L, b, max_len, kv_heads, D, jnp.float32)
    paged = PagedCache.init(L, b * 3, PAGE, kv_heads, D, jnp.float32, jnp.asarray(tables))
    assert dense.k.shape == (L, b, max_len, kv_heads, D)  # K/V heads stored once, not per H
    assert paged.k_pages.shape == (L, b * 3, PAGE, kv_heads, D)

    @jax.jit
    def step(dense: DenseCache, paged: PagedCache, q: jax.Array, k: jax.Array, v: jax.Array,
             pos: jax.Array) -> tuple[Any, ...]:
        outs = []
        for layer in range(L):  # layer l stores k * (l + 1): layers must not mix
            do, dense = dense.update_and_attend(layer, q, k * (layer + 1), v, pos)
            po, paged = paged.update_and_attend(layer, q, k * (layer + 1), v, pos)
            outs.append((do, po))
        return outs, dense.advance(pos), paged.advance(pos)

    col = np.arange(width)[None]
    prefill = np.where(col < np.array(lengths)[:, None], col, -1).astype(np.int32)
    decode = np.where(col == 0, np.array(lengths)[:, None], -1).astype(np.int32)
    keys = np.zeros((b, max_len, kv_heads, D))
    values = np.zeros((b, max_len, kv_heads, D))
    for pos in (prefill, decode):
        q = rng.standard_normal((b, width, H, D)).astype(np.float32)
        k = rng.standard_normal((b, width, kv_heads, D)).astype(np.float32)
        v = rng.standard_normal((b, width, kv_heads, D)).astype(np.float32)
        for i, j in zip(*np.nonzero(pos >= 0), strict=True):
            keys[i, pos[i, j]], values[i, pos[i, j]] = k[i, j], v[i, j]
        outs, dense, paged = step(dense, paged, q, k, v, jnp.asarray(pos))
        stored = np.where(keys.any(axis=(2, 3)), np.arange(max_len), -1)
        for layer, (do, po) in enumerate(outs):
            want = _ref(q.astype(np.float64), keys * (layer + 1), values, pos, stored)
            np.testing.assert_allclose(np.asarray(do), want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(po), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(dense.lengths), np.array(lengths) + 1)
    np.testing.assert_array_equal(np.asarray(paged.lengths), np.array(lengths) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 4])  # 2 is the shared fixtures' GQA
def test_mqa_and_mha_models_match_transformers(kv_heads: int, tmp_path: Path) -> None:
    """Logits vs transformers, and greedy dense == paged == transformers' generate."""
    path = build_tiny_checkpoint(tmp_path, num_kv_heads=kv_heads, seed=kv_heads)
    lm = load_checkpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = np.random.default_rng(kv_heads).integers(0, lm.config.vocab_size, (2, 21))
    pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (2, 21))
    ours, _ = jax.jit(lm.model.apply)({"params": lm.params}, jnp.asarray(tokens, jnp.int32),
                                      pos, DenseCache.init(lm.config.num_layers, 2, 32,
                                                           kv_heads, lm.config.head_dim,
                                                           jnp.float32))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    prompts = [tokens[0, :9].tolist(), tokens[1, :3].tolist()]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=12, cache="dense")
    paged = generate(lm.model, lm.params, prompts, max_new_tokens=12, cache="paged",
                     block_size=4)
    assert dense.tokens == paged.tokens
    for prompt, toks in zip(prompts, dense.tokens, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert toks == out[0, len(prompt):].tolist()
