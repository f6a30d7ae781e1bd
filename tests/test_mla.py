"""MLA: our DeepSeek-V2/V3 decoder vs transformers, the naive and absorbed paths vs a
float64 NumPy reference, the dense latent cache, and greedy generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvjax.analysis.sizing import kv_bytes_per_token
from kvjax.analysis.spec import ArchSpec
from kvjax.attention import position_mask
from kvjax.cache import LatentCache, NoCache
from kvjax.config import ConfigError
from kvjax.engine.generate import generate
from kvjax.mla_config import MLAConfig
from kvjax.models.checkpoint import CheckpointError
from kvjax.models.mla import MLADecoder, attend_absorbed, attend_naive
from kvjax.models.mla_checkpoint import LoadedMLAModel, load_mla_checkpoint
from kvjax.models.tiny import build_tiny_mla_checkpoint


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V2 (complex-number interleaved RoPE) with a query latent, attention bias
    and tied embeddings."""
    return build_tiny_mla_checkpoint(tmp_path_factory.mktemp("dsv2"), family="deepseek_v2",
                                     q_lora_rank=24, attention_bias=True,
                                     tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="module")
def v2(v2_dir: Path) -> LoadedMLAModel:
    return load_mla_checkpoint(v2_dir)


@pytest.fixture(scope="module")
def v2_hf(v2_dir: Path) -> Any:
    return _hf_model(v2_dir)


def _hf_model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _logits(model: MLADecoder, params: Any, tokens: np.ndarray) -> np.ndarray:
    """No-cache forward of right-unpadded ``tokens`` [B, T] (one compile per model)."""
    pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens, jnp.int32),
                                  jnp.asarray(pos), NoCache())
    return np.asarray(out)


# ----------------------------------------------------------------- vs transformers


def test_v2_naive_and_absorbed_match_transformers(v2: LoadedMLAModel, v2_hf: Any) -> None:
    tokens = np.random.default_rng(0).integers(0, v2.config.vocab_size, (2, 23))
    ref = _hf_logits(v2_hf, tokens)
    absorbed = _logits(v2.model, v2.params, tokens)
    naive = _logits(MLADecoder(v2.config, attention="naive"), v2.params, tokens)
    assert np.abs(ref).max() > 1.0  # not a comparison of near-zero tensors
    assert np.abs(naive - ref).max() <= 3e-5
    assert np.abs(absorbed - ref).max() <= 3e-5
    assert np.abs(absorbed - naive).max() <= 3e-5


# (rope_interleave, llama3 RoPE scaling, tokens): 100 tokens reach the scaled pairs.
V3_CASES = [pytest.param(False, False, 17, id="rotate-half"),
            pytest.param(True, False, 17, id="interleaved", marks=pytest.mark.slow),
            pytest.param(True, True, 100, id="llama3-scaling", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("interleave", "llama3", "length"), V3_CASES)
def test_v3_matches_transformers(interleave: bool, llama3: bool, length: int,
                                 tmp_path: Path) -> None:
    path = build_tiny_mla_checkpoint(tmp_path, family="deepseek_v3", rope_interleave=interleave,
                                     llama3_rope_scaling=llama3, max_position_embeddings=128,
                                     qk_nope_head_dim=8, v_head_dim=16, seed=5)
    lm = load_mla_checkpoint(path)
    assert lm.config.rope_interleave is interleave
    assert (lm.config.rope_scaling is not None) is llama3
    tokens = np.random.default_rng(1).integers(0, lm.config.vocab_size, (2, length))
    ref = _hf_logits(_hf_model(path), tokens)
    assert np.abs(_logits(lm.model, lm.params, tokens) - ref).max() <= 3e-5 * (length / 17)


def test_greedy_generation_matches_transformers_and_recompute(v2: LoadedMLAModel,
                                                              v2_hf: Any) -> None:
    """Dense latent cache == no-cache recomputation (4 mixed-length prompts, 20 tokens) ==
    transformers' greedy generate (on two of them, 12 tokens: it is slow on CPU)."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, v2.config.vocab_size, n).tolist() for n in (17, 1, 30, 5)]
    cached = generate(v2.model, v2.params, prompts, max_new_tokens=20, cache="dense")
    uncached = generate(v2.model, v2.params, prompts, max_new_tokens=20, cache="none")
    assert cached.tokens == uncached.tokens
    assert len({tuple(t) for t in cached.tokens}) == len(prompts)
    for prompt, toks in zip(prompts[:2], cached.tokens, strict=False):
        with torch.no_grad():
            out = v2_hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                 max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert toks[:12] == out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_naive_path_generation_equals_absorbed(v2: LoadedMLAModel) -> None:
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, v2.config.vocab_size, n).tolist() for n in (9, 2)]
    naive = MLADecoder(v2.config, attention="naive")
    a = generate(naive, v2.params, prompts, max_new_tokens=16, cache="dense")
    b = generate(v2.model, v2.params, prompts, max_new_tokens=16, cache="dense")
    assert a.tokens == b.tokens


def test_per_head_caches_are_refused(v2: LoadedMLAModel) -> None:
    with pytest.raises(ValueError, match="MLA model"):
        generate(v2.model, v2.params, [[5, 6]], max_new_tokens=2, cache="concat")
    with pytest.raises(ValueError, match="paged latent cache attends with one of"):
        generate(v2.model, v2.params, [[5, 6]], max_new_tokens=2, cache="paged",
                 attention="triton")


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_paged_latent_generation_equals_dense(v2: LoadedMLAModel, block_size: int) -> None:
    """Latent rows in pool pages (partial last blocks, a block larger than
    every prompt) give the dense latent cache's tokens; the pool is sized in latent rows."""
    rng = np.random.default_rng(7 + block_size)
    prompts = [rng.integers(3, v2.config.vocab_size, n).tolist() for n in (13, 1, 22)]
    dense = generate(v2.model, v2.params, prompts, max_new_tokens=12, cache="dense")
    paged = generate(v2.model, v2.params, prompts, max_new_tokens=12, cache="paged",
                     block_size=block_size)
    assert paged.tokens == dense.tokens
    need = sum(-(-(len(p) + 12) // block_size) for p in prompts)
    with pytest.raises(ValueError, match="pool too small"):
        generate(v2.model, v2.params, prompts, max_new_tokens=12, cache="paged",
                 block_size=block_size, num_blocks=need - 1)


# --------------------------------------------------------- attention paths, float64


def _ref_mla(q_nope: np.ndarray, q_rope: np.ndarray, rows: np.ndarray, w: np.ndarray,
             mask: np.ndarray, rope_key_heads: int, scale: float) -> np.ndarray:
    """float64 MLA attention with per-head keys and values written out explicitly."""
    b, t, h, dn = q_nope.shape
    r = w.shape[0]
    out = np.zeros((b, t, h, w.shape[2] - dn))
    for head in range(h):
        g = head // (h // rope_key_heads)
        dr = q_rope.shape[-1]
        k = np.concatenate([rows[..., :r] @ w[:, head, :dn],
                            rows[..., r + g * dr: r + (g + 1) * dr]], axis=-1)  # [B, S, dq]
        v = rows[..., :r] @ w[:, head, dn:]
        q = np.concatenate([q_nope[:, :, head], q_rope[:, :, head]], axis=-1)  # [B, T, dq]
        s = np.einsum("btd,bsd->bts", q, k) * scale
        s = np.where(mask, s, -np.inf)
        top = np.max(s, axis=-1, keepdims=True)
        e = np.where(mask, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
        denom = e.sum(-1, keepdims=True)
        p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
        out[:, :, head] = p @ v
    return out


# DeepSeek's shape (one RoPE key head), and a converted GQA model's (several, no nope dims).
@pytest.mark.parametrize(("heads", "rope_key_heads", "dn"), [(4, 1, 6), (6, 2, 0)])
def test_naive_and_absorbed_paths_vs_float64(heads: int, rope_key_heads: int, dn: int) -> None:
    """Both paths against explicit per-head attention, with padding and a causal mask."""
    rng = np.random.default_rng(heads + rope_key_heads + dn)
    b, t, s, r, dr, dv = 2, 3, 9, 10, 4, 5
    q_nope = rng.standard_normal((b, t, heads, dn))
    q_rope = rng.standard_normal((b, t, heads, dr))
    rows = rng.standard_normal((b, s, r + rope_key_heads * dr))
    w = rng.standard_normal((r, heads, dn + dv)) * 0.5
    q_pos = np.array([[6, 7, 8], [2, -1, -1]], np.int32)
    k_pos = np.where(np.arange(s) < np.array([[9], [3]]), np.arange(s), -1).astype(np.int32)
    mask = np.asarray(position_mask(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    scale = (dn + dr) ** -0.5
    ref = _ref_mla(q_nope, q_rope, rows, w, mask[:, :, :], rope_key_heads, scale)
    args = [jnp.asarray(x, jnp.float32) for x in (q_nope, q_rope, rows, w)]
    for attend in (attend_naive, attend_absorbed):
        out = jax.jit(attend, static_argnames=("rope_key_heads", "scale"))(
            *args, jnp.asarray(mask), rope_key_heads=rope_key_heads, scale=scale)
        chex.assert_shape(out, (b, t, heads, dv))
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert np.all(ref[1, 1:] == 0)  # padded queries give zeros


# ------------------------------------------------------------------ latent cache


def test_latent_cache_writes_slots_drops_padding_and_sizes_exactly() -> None:
    cfg = MLAConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6,
                    v_head_dim=8)
    batch, max_len = 2, 16
    cache = LatentCache.init(cfg.num_layers, batch, max_len, cfg.latent_width, jnp.bfloat16)
    spec = ArchSpec.from_mla_config(cfg)
    per_token = kv_bytes_per_token(spec, "bf16")
    assert per_token == (12 + 6) * 3 * 2
    assert cache.ckv.nbytes == per_token * batch * max_len  # the device buffer, exactly

    @jax.jit
    def step(cache: LatentCache, rows: jax.Array, pos: jax.Array) -> tuple[Any, ...]:
        read, key_pos, cache = cache.update_and_read(1, rows, pos)
        return read, key_pos, cache.advance(pos)

    rng = np.random.default_rng(7)
    pos = np.array([[0, 1, 2, 3], [0, 1, -1, -1]], np.int32)
    rows = rng.standard_normal((batch, 4, cfg.latent_width)).astype(np.float32)
    read, key_pos, new = step(cache, jnp.asarray(rows), jnp.asarray(pos))
    np.testing.assert_array_equal(np.asarray(new.lengths), [4, 2])
    np.testing.assert_array_equal(np.asarray(key_pos), np.tile(np.arange(max_len), (batch, 1)))
    stored = np.asarray(new.ckv, np.float32)
    want = np.zeros_like(stored)
    want[1, 0, :4] = np.asarray(jnp.asarray(rows[0], jnp.bfloat16), np.float32)
    want[1, 1, :2] = np.asarray(jnp.asarray(rows[1, :2], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(stored, want)  # other layers and padding untouched
    np.testing.assert_array_equal(np.asarray(read, np.float32), want[1])

    decode = np.array([[4, -1, -1, -1], [-1, -1, -1, -1]], np.int32)  # sequence 1 finished
    _, _, newer = step(new, jnp.asarray(rows), jnp.asarray(decode))
    np.testing.assert_array_equal(np.asarray(newer.lengths), [5, 2])
    np.testing.assert_array_equal(np.asarray(newer.ckv[1, 0, 4], np.float32), want[1, 0, 0])


# ------------------------------------------------------------------ config errors


def _v2_raw(v2_dir: Path) -> dict[str, Any]:
    return json.loads((v2_dir / "config.json").read_text())


def test_config_parsed_from_checkpoint(v2: LoadedMLAModel) -> None:
    cfg = v2.config
    assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank) == (16, 8, 24)
    assert cfg.latent_width == 24 and cfg.rope_key_heads == 1 and cfg.rope_interleave
    assert cfg.attention_bias and cfg.tie_word_embeddings


@pytest.mark.parametrize(("edit", "field"), [
    ({"first_k_dense_replace": 1}, "first_k_dense_replace"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"head_dim": 16}, "head_dim"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_mla": False}, "use_mla"),
    ({"mystery_field": 1}, "mystery_field"),
    ({"model_type": "llama"}, "model_type"),
])
def test_bad_configs_name_the_field(v2_dir: Path, edit: dict[str, Any], field: str) -> None:
    raw = {**_v2_raw(v2_dir), **edit}
    with pytest.raises(ConfigError, match=field):
        MLAConfig.from_hf_dict(raw)


def test_missing_rank_field_and_missing_tensor(v2_dir: Path, tmp_path: Path) -> None:
    raw = _v2_raw(v2_dir)
    del raw["q_lora_rank"]
    with pytest.raises(ConfigError, match="q_lora_rank"):
        MLAConfig.from_hf_dict(raw)
    (tmp_path / "config.json").write_text(json.dumps(_v2_raw(v2_dir)))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(v2_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_mla_checkpoint(tmp_path)
