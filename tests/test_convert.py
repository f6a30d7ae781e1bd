"""Conversions: MHA -> GQA/MQA by mean-pooling K/V heads, MHA/GQA -> MLA by SVD."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.analysis.sizing import kv_bytes_per_token, param_count
from kvjax.analysis.spec import ArchSpec
from kvjax.cache import LatentCache, NoCache
from kvjax.config import Llama3RopeScaling, ModelConfig, rope_inv_freq
from kvjax.convert import low_rank_factors, mean_pool_kv_heads, to_mla
from kvjax.models.checkpoint import module_param_shapes
from kvjax.models.llama import Decoder
from kvjax.models.mla import MLADecoder
from kvjax.models.random_init import random_params


def _cfg(num_kv_heads: int, **kw: Any) -> ModelConfig:
    """A small Llama with Llama-3 RoPE scaling (positions up to 40 use scaled pairs)."""
    base: dict[str, Any] = dict(
        family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, max_position_embeddings=256,
        rope_scaling=Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16))
    return ModelConfig(**{**base, **kw})


def _logits(model: Any, params: Any, tokens: jax.Array) -> np.ndarray:
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens, pos, NoCache())[0])


def _tokens(seed: int, shape: tuple[int, int] = (2, 40)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 97, shape), jnp.int32)


# ------------------------------------------------------------------ mean pooling


def test_mean_pool_with_group_size_one_is_the_identity() -> None:
    cfg = _cfg(4)
    params = random_params(cfg, jnp.float32, seed=0, scale=0.25)
    new_cfg, pooled = mean_pool_kv_heads(cfg, params, 4)
    assert new_cfg == cfg
    flat = jax.tree_util.tree_leaves_with_path(pooled)
    ref = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(flat) == len(ref)
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[path]))


@pytest.mark.parametrize("new", [2, 1])
def test_pooled_weights_are_the_float64_mean(new: int) -> None:
    cfg = _cfg(4, qkv_bias=True, o_bias=True)
    params = random_params(cfg, jnp.float32, seed=1, scale=0.25)
    new_cfg, pooled = mean_pool_kv_heads(cfg, params, new)
    assert new_cfg.num_kv_heads == new
    d, group = cfg.head_dim, 4 // new
    for i in range(cfg.num_layers):
        for name in ("k_proj", "v_proj"):
            for leaf in ("kernel", "bias"):
                old = np.asarray(params[f"layers_{i}"]["self_attn"][name][leaf], np.float64)
                heads = [old[..., j * d:(j + 1) * d] for j in range(4)]
                want = np.concatenate(
                    [np.mean(heads[j * group:(j + 1) * group], axis=0) for j in range(new)],
                    axis=-1)
                got = np.asarray(pooled[f"layers_{i}"]["self_attn"][name][leaf])
                assert got.shape == want.shape and got.dtype == np.float32
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        q = f"layers_{i}"
        assert pooled[q]["self_attn"]["q_proj"] is params[q]["self_attn"]["q_proj"]


@pytest.mark.slow
def test_pooling_heads_that_agree_in_each_group_keeps_the_model() -> None:
    """When the heads of each group are equal, the pooled GQA model is the MHA model."""
    cfg = _cfg(4)
    params = random_params(cfg, jnp.float32, seed=2, scale=0.25)
    for i in range(cfg.num_layers):
        for name in ("k_proj", "v_proj"):
            w = np.asarray(params[f"layers_{i}"]["self_attn"][name]["kernel"])
            w = w.reshape(64, 2, 2, 16)[:, :, :1].repeat(2, axis=2).reshape(64, 64)
            params[f"layers_{i}"]["self_attn"][name]["kernel"] = jnp.asarray(w)
    new_cfg, pooled = mean_pool_kv_heads(cfg, params, 2)
    tokens = _tokens(3)
    ref = _logits(Decoder(cfg), params, tokens)
    np.testing.assert_allclose(_logits(Decoder(new_cfg), pooled, tokens), ref, atol=1e-4)


def test_mean_pool_rejects_a_non_divisor() -> None:
    cfg = _cfg(4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        mean_pool_kv_heads(cfg, {}, 3)


# --------------------------------------------------------------------------- SVD


def test_full_rank_mla_reproduces_the_gqa_model() -> None:
    """Full rank, all RoPE kept: the converted model is the original, on both paths
    (several RoPE key heads, no non-RoPE dims)."""
    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=4, scale=0.25)
    conv = to_mla(cfg, params, kv_lora_rank=32)
    assert conv.full_rank == 32 and max(conv.errors) < 1e-12
    tokens = _tokens(5)
    ref = _logits(Decoder(cfg), params, tokens)
    assert np.abs(ref).max() > 1.0
    for attention in ("naive", "absorbed"):
        out = _logits(MLADecoder(conv.config, attention=attention), conv.params, tokens)
        assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.slow
def test_full_rank_mla_reproduces_the_mha_model() -> None:
    cfg = _cfg(4)
    params = random_params(cfg, jnp.float32, seed=6, scale=0.25)
    conv = to_mla(cfg, params, kv_lora_rank=64)
    tokens = _tokens(7)
    ref = _logits(Decoder(cfg), params, tokens)
    assert np.abs(_logits(MLADecoder(conv.config), conv.params, tokens) - ref).max() <= 1e-4


@pytest.mark.parametrize("rope_dim", [pytest.param(16, marks=pytest.mark.slow), 8])
def test_reconstruction_error_falls_with_rank(rope_dim: int) -> None:
    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=8, scale=0.25)
    full = to_mla(cfg, params, 1, rope_dim).full_rank
    errors = np.array([to_mla(cfg, params, r, rope_dim).errors for r in range(1, full + 1)])
    assert np.all(np.diff(errors, axis=0) < 0)  # strictly decreasing, every layer
    assert errors[0].min() > 0.1 and errors[-1].max() < 1e-12
    # Eckart-Young, computed another way: the error is the tail of the spectrum of M^T M.
    w = {n: np.asarray(params["layers_1"]["self_attn"][n]["kernel"], np.float64)
         for n in ("k_proj", "v_proj")}
    nope = [j for j in range(16) if rope_dim // 2 <= j % 8]
    k_nope = w["k_proj"].reshape(64, 2, 16)[..., nope].reshape(64, -1)
    m = np.concatenate([k_nope, w["v_proj"]], axis=1)
    energy = np.sort(np.linalg.eigvalsh(m.T @ m))[::-1].clip(min=0)
    tail = np.sqrt([energy[r:].sum() / energy.sum() for r in range(1, full + 1)])
    np.testing.assert_allclose(errors[:, 1], tail, atol=1e-7)


def test_partial_rope_keeps_the_highest_frequencies_exactly() -> None:
    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=9, scale=0.25)
    conv = to_mla(cfg, params, kv_lora_rank=20, rope_dim=6)
    mla = conv.config
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.rope_key_heads) == (10, 6, 2)
    np.testing.assert_allclose(rope_inv_freq(mla), rope_inv_freq(cfg)[:3], rtol=1e-12)


def test_converted_sizes_match_the_buffers_and_parameters() -> None:
    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=10, scale=0.25)
    conv = to_mla(cfg, params, kv_lora_rank=12, rope_dim=8)
    spec = ArchSpec.from_mla_config(conv.config)
    assert kv_bytes_per_token(spec, "fp32") == (12 + 2 * 8) * cfg.num_layers * 4
    cache = LatentCache.init(cfg.num_layers, 3, 32, conv.config.latent_width, jnp.float32)
    assert cache.ckv.nbytes == kv_bytes_per_token(spec, "fp32") * 3 * 32
    shapes = module_param_shapes(MLADecoder(conv.config))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, conv.params)
    assert param_count(spec) == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kv_lora_rank": 33}, "rank"),
    ({"kv_lora_rank": 0}, "rank"),
    ({"kv_lora_rank": 8, "rope_dim": 7}, "rope_dim"),
    ({"kv_lora_rank": 8, "rope_dim": 18}, "rope_dim"),
])
def test_to_mla_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=11, scale=0.25)
    with pytest.raises(ValueError, match=message):
        to_mla(cfg, params, **kwargs)


def test_to_mla_rejects_attention_bias() -> None:
    cfg = _cfg(2, qkv_bias=True)
    with pytest.raises(ValueError, match="bias"):
        to_mla(cfg, random_params(cfg, jnp.float32, seed=12), kv_lora_rank=8)


def test_low_rank_factors_shapes() -> None:
    m = np.random.default_rng(13).standard_normal((10, 6))
    down, up, error = low_rank_factors(m, 6)
    assert down.shape == (10, 6) and up.shape == (6, 6) and error < 1e-14
    np.testing.assert_allclose(down @ up, m, atol=1e-12)


@pytest.mark.slow
def test_converted_model_generates_as_the_original() -> None:
    """Greedy generation of the full-rank MLA model over its latent cache equals the
    original model's over its per-head cache."""
    from kvjax.engine.generate import generate

    cfg = _cfg(2)
    params = random_params(cfg, jnp.float32, seed=14, scale=0.25)
    conv = to_mla(cfg, params, kv_lora_rank=32)
    prompts = [[5, 6, 7, 8], list(range(10, 40))]
    ref = generate(Decoder(cfg), params, prompts, max_new_tokens=24)
    out = generate(MLADecoder(conv.config), conv.params, prompts, max_new_tokens=24)
    assert out.tokens == ref.tokens
