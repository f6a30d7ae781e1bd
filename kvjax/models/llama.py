"""Llama / Qwen2-family decoder in Flax Linen (Touvron et al., 2023; Qwen2 report, 2024).

RoPE (Su et al.), RMSNorm, SwiGLU MLP, grouped K/V heads, optional q/k/v (and o)
biases, optional tied embeddings, Llama-3 RoPE scaling. The numerics follow the
Hugging Face implementation (RMSNorm in float32, rotate-half RoPE) so logits match
``transformers`` on the same weights.

The forward is a pure function ``(params, tokens, positions, cache) -> (logits, cache)``;
the cache is any layout implementing ``kvjax.cache.base.KVCache``. Parameter names
mirror the Hugging Face module tree (``layers_3/self_attn/q_proj/kernel`` is
``model.layers.3.self_attn.q_proj.weight`` transposed).
"""

from __future__ import annotations

from functools import partial
from typing import TypeVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, RopeSpec, rope_inv_freq

C = TypeVar("C")


class RMSNorm(nn.Module):
    """``w * x / rms(x)``, normalised in float32 and cast back before the weight."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.param("weight", nn.initializers.ones, (x.shape[-1],),
                                      self.dtype), self.eps)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``w * x / rms(x)`` over the last axis, normalised in float32, cast back first."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope_tables(cfg: RopeSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for ``positions`` [B, T] -> each [B, T, rope_dim] float32."""
    inv_freq = jnp.asarray(np.asarray(rope_inv_freq(cfg), np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, T, N, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


class Attention(nn.Module):
    cfg: ModelConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 cache: C) -> tuple[jax.Array, C]:
        cfg = self.cfg
        b, t, _ = x.shape
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
        q = dense(cfg.num_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="q_proj")(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="k_proj")(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        out, cache = cache.update_and_attend(  # type: ignore[attr-defined]
            self.layer, q, k, v, positions)
        out = out.astype(self.dtype).reshape(b, t, cfg.num_heads * cfg.head_dim)
        return dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(out), cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        gate = dense(self.intermediate_size, name="gate_proj")(x)
        up = dense(self.intermediate_size, name="up_proj")(x)
        return dense(self.hidden_size, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 cache: C) -> tuple[jax.Array, C]:
        norm = partial(RMSNorm, eps=self.cfg.rms_norm_eps, dtype=self.dtype)
        h, cache = Attention(self.cfg, self.layer, self.dtype, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, positions, cache)
        x = x + h
        mlp = MLP(self.cfg.hidden_size, self.cfg.intermediate_size, self.dtype, name="mlp")
        x = x + mlp(norm(name="post_attention_layernorm")(x))
        return x, cache


class Decoder(nn.Module):
    """The whole model. ``dtype`` is both the parameter and the compute dtype."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: C,
                 logit_index: jax.Array | None = None) -> tuple[jax.Array, C]:
        """Run one step.

        Args:
          tokens: int32 [B, T] token ids.
          positions: int32 [B, T] absolute positions; -1 marks padding.
          cache: a KV cache pytree (see ``kvjax.cache``).
          logit_index: optional int32 [B]; if given, logits only at that index of T.

        Returns:
          float32 logits [B, T, V] (or [B, V] with ``logit_index``) and the new cache.
        """
        cfg = self.cfg
        chex.assert_rank([tokens, positions], 2)
        chex.assert_equal_shape([tokens, positions])
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                         param_dtype=self.dtype, name="embed_tokens")
        x = embed(tokens)
        cos, sin = rope_tables(cfg, positions)
        for i in range(cfg.num_layers):
            x, cache = DecoderLayer(cfg, i, self.dtype, name=f"layers_{i}")(
                x, cos, sin, positions, cache)
        cache = cache.advance(positions)  # type: ignore[attr-defined]
        logits = output_logits(x, embed, logit_index, eps=cfg.rms_norm_eps,
                               tie_word_embeddings=cfg.tie_word_embeddings, dtype=self.dtype)
        return logits, cache


def output_logits(x: jax.Array, embed: nn.Embed, logit_index: jax.Array | None, *, eps: float,
                  tie_word_embeddings: bool, dtype: jnp.dtype) -> jax.Array:
    """Final RMSNorm (``norm``) and LM head (``lm_head``, or the tied ``embed``).

    Called inside a decoder's compact ``__call__``, so both are that decoder's submodules.
    x [B, T, hidden]; logit_index optional int32 [B] -> float32 [B, T, V] (or [B, V]).
    """
    if logit_index is not None:
        x = x[jnp.arange(x.shape[0]), logit_index][:, None]
    x = RMSNorm(eps, dtype, name="norm")(x)
    if tie_word_embeddings:
        logits = embed.attend(x)
    else:
        logits = nn.Dense(embed.num_embeddings, use_bias=False, dtype=dtype, param_dtype=dtype,
                          name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    return logits[:, 0] if logit_index is not None else logits
