"""Multi-head latent attention (DeepSeek-AI, "DeepSeek-V2", 2024) and its decoder, in Flax Linen.

Per layer, from the normed hidden state ``x``:

* queries ``q = x W_q`` (or ``RMSNorm(x W_qa) W_qb`` with ``q_lora_rank``), split per head
  into ``q_nope`` [dn] and ``q_rope`` [dr], RoPE on ``q_rope``;
* one row ``x W_kva`` = [latent c_KV (r) | RoPE key heads (Kr * dr)]; c_KV through
  ``kv_a_layernorm`` (RMSNorm), RoPE on the key heads. Only this row is cached;
* ``kv_b_proj`` (W_kvb [r, H, dn + dv]) expands c_KV into per-head non-RoPE keys
  (``W_uk = W_kvb[..., :dn]``) and values (``W_uv = W_kvb[..., dn:]``).

Two attention paths compute the same function (the decoder's ``attention``):

* ``"naive"`` expands K/V for every cached token, as ``transformers`` does:
  ``k_h = [c W_uk_h | k_rope]``, ``v_h = c W_uv_h``, then ordinary attention;
* ``"absorbed"`` folds W_uk into the query and W_uv into the output and attends over
  the cached rows themselves, an MQA with key [c | k_rope] and value c:
  ``score = (q_nope W_uk^T) . c + q_rope . k_rope``, ``out_h = (sum p c) W_uv_h``.
  Nothing per head is built for the cached tokens.

RoPE: DeepSeek rotates interleaved pairs (2i, 2i+1) (``rope_interleave``); we gather the
even then the odd dims and apply rotate-half RoPE (``llama.apply_rope``), the same
rotation up to a fixed permutation of the RoPE dims, applied to queries and keys alike,
so every dot product is unchanged. The scale is ``qk_head_dim ** -0.5``.

Parameter names mirror the Hugging Face module tree, as in :mod:`kvjax.models.llama`,
whose RMSNorm, SwiGLU MLP, RoPE tables and output head are reused.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, TypeVar, cast

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.attention import position_mask, sdpa
from kvjax.cache.paged_latent import PagedLatentCache
from kvjax.mla_config import MLAConfig
from kvjax.models.llama import MLP, RMSNorm, apply_rope, output_logits, rope_tables

C = TypeVar("C")
MLAPath = Literal["naive", "absorbed"]
MLA_PATHS: tuple[MLAPath, ...] = ("naive", "absorbed")

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default epsilon,
# not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def rope_last(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """RoPE on the last dim of x [B, T, N, d]; cos/sin [B, T, d] (rotate-half tables).

    With ``interleave`` the pairs are (2i, 2i+1): the dims are gathered evens-then-odds
    first, so the result is in rotate-half layout (as transformers' DeepSeek-V3 returns).
    """
    if interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    return apply_rope(x, cos, sin)


class KVUp(nn.Module):
    """The up-projection W_kvb of ``kv_b_proj`` as a kernel [r, H, dn + dv] (no bias)."""

    cfg: MLAConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.cfg
        width = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (cfg.kv_lora_rank, width), self.dtype)
        return kernel.reshape(cfg.kv_lora_rank, cfg.num_heads, -1)


def _check_args(q_nope: jax.Array, q_rope: jax.Array, rows: jax.Array, w_kvb: jax.Array,
                mask: jax.Array, rope_key_heads: int) -> None:
    chex.assert_rank([q_nope, q_rope, rows, w_kvb, mask], [4, 4, 3, 3, 3])
    b, t, h, dn = q_nope.shape
    chex.assert_shape(q_rope, (b, t, h, None))
    chex.assert_shape(w_kvb, (None, h, None))
    chex.assert_shape(rows, (b, None, w_kvb.shape[0] + rope_key_heads * q_rope.shape[-1]))
    chex.assert_shape(mask, (b, t, rows.shape[1]))
    if h % rope_key_heads or w_kvb.shape[2] <= dn:
        raise ValueError(f"rope_key_heads={rope_key_heads} must divide {h} heads and "
                         f"kv_b_proj's width {w_kvb.shape[2]} exceed dn={dn}")


def attend_naive(q_nope: jax.Array, q_rope: jax.Array, rows: jax.Array, w_kvb: jax.Array,
                 mask: jax.Array, *, rope_key_heads: int, scale: float) -> jax.Array:
    """Attention with K/V expanded from the latent for every key.

    q_nope [B, T, H, dn], q_rope [B, T, H, dr], rows [B, S, r + Kr * dr] (cached rows),
    w_kvb [r, H, dn + dv], mask bool [B, T, S] -> [B, T, H, dv] in ``rows``' dtype.
    """
    _check_args(q_nope, q_rope, rows, w_kvb, mask, rope_key_heads)
    b, s, _ = rows.shape
    r, h, _ = w_kvb.shape
    dn, dr = q_nope.shape[-1], q_rope.shape[-1]
    kv = jnp.einsum("bsr,rhd->bshd", rows[..., :r], w_kvb, preferred_element_type=jnp.float32)
    kv = kv.astype(rows.dtype)
    k_rope = rows[..., r:].reshape(b, s, rope_key_heads, dr)
    k_rope = jnp.repeat(k_rope, h // rope_key_heads, axis=2)  # query head h -> key head h // g
    k = jnp.concatenate([kv[..., :dn], k_rope], axis=-1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    return sdpa(q, k, kv[..., dn:], mask, scale=scale)


def attend_absorbed(q_nope: jax.Array, q_rope: jax.Array, rows: jax.Array, w_kvb: jax.Array,
                    mask: jax.Array, *, rope_key_heads: int, scale: float) -> jax.Array:
    """Attention over the cached rows: W_uk folded into the query, W_uv into the output.

    Same arguments and result as :func:`attend_naive`. Each RoPE key head ``g`` with the
    latent forms one MQA-style key ``[c | k_rope_g]`` of width r + dr shared by the query
    heads of group ``g``; the value is the latent c itself.
    """
    _check_args(q_nope, q_rope, rows, w_kvb, mask, rope_key_heads)
    b, s, _ = rows.shape
    r = w_kvb.shape[0]
    dr = q_rope.shape[-1]
    q = jnp.concatenate([absorb_query(q_nope, q_rope, w_kvb), q_rope], axis=-1)
    latent = jnp.broadcast_to(rows[:, :, None, :r], (b, s, rope_key_heads, r))
    k = jnp.concatenate([latent, rows[..., r:].reshape(b, s, rope_key_heads, dr)], axis=-1)
    out_lat = sdpa(q, k, latent, mask, scale=scale)  # [B, T, H, r]
    return absorb_output(out_lat, w_kvb, q_nope.shape[-1]).astype(rows.dtype)


def absorb_query(q_nope: jax.Array, q_rope: jax.Array, w_kvb: jax.Array) -> jax.Array:
    """``q_lat = q_nope W_uk``: q_nope [..., H, dn], w_kvb [r, H, dn + dv] -> [..., H, r]
    in ``q_rope``'s dtype."""
    dn = q_nope.shape[-1]
    return jnp.einsum("...hd,rhd->...hr", q_nope, w_kvb[..., :dn],
                      preferred_element_type=jnp.float32).astype(q_rope.dtype)


def absorb_output(out_lat: jax.Array, w_kvb: jax.Array, dn: int) -> jax.Array:
    """``out = out_lat W_uv``: out_lat [..., H, r] -> float32 [..., H, dv]."""
    return jnp.einsum("...hr,rhd->...hd", out_lat, w_kvb[..., dn:],
                      preferred_element_type=jnp.float32)


class MLAttention(nn.Module):
    """One MLA block: x [B, T, hidden] -> [B, T, hidden]; writes layer ``layer``'s rows."""

    cfg: MLAConfig
    layer: int
    dtype: jnp.dtype
    attention: MLAPath

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 cache: C) -> tuple[jax.Array, C]:
        cfg = self.cfg
        b, t, _ = x.shape
        h, dn, dr, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype)
        norm = partial(RMSNorm, LATENT_NORM_EPS, self.dtype)
        if cfg.q_lora_rank is None:
            q = dense(h * cfg.qk_head_dim, use_bias=False, name="q_proj")(x)
        else:
            q = dense(cfg.q_lora_rank, use_bias=cfg.attention_bias, name="q_a_proj")(x)
            q = dense(h * cfg.qk_head_dim, use_bias=False, name="q_b_proj")(
                norm(name="q_a_layernorm")(q))
        q = q.reshape(b, t, h, cfg.qk_head_dim)
        q_rope = rope_last(q[..., dn:], cos, sin, cfg.rope_interleave)

        kv = dense(cfg.latent_width, use_bias=cfg.attention_bias, name="kv_a_proj_with_mqa")(x)
        latent = kv[..., :r]
        if cfg.latent_norm:
            latent = norm(name="kv_a_layernorm")(latent)
        k_rope = rope_last(kv[..., r:].reshape(b, t, cfg.rope_key_heads, dr), cos, sin,
                           cfg.rope_interleave)
        rows = jnp.concatenate([latent, k_rope.reshape(b, t, -1)], axis=-1)
        w_kvb = KVUp(cfg, self.dtype, name="kv_b_proj")()
        scale = cfg.qk_head_dim ** -0.5
        if self.attention == "absorbed" and isinstance(cache, PagedLatentCache) and (
                cache.uses_kernel(t)):  # one token per row: the kernel reads the pages
            paged = cache.update(self.layer, rows, positions)
            cache = cast(C, paged)
            q_lat = absorb_query(q[:, 0, :, :dn], q_rope[:, 0], w_kvb)
            out_lat = paged.decode_absorbed(self.layer, q_lat, q_rope[:, 0], positions, scale)
            out = absorb_output(out_lat, w_kvb, dn)[:, None]
        else:
            rows, key_pos, cache = cache.update_and_read(  # type: ignore[attr-defined]
                self.layer, rows, positions)
            attend = attend_naive if self.attention == "naive" else attend_absorbed
            out = attend(q[..., :dn], q_rope, rows.astype(self.dtype), w_kvb,
                         position_mask(positions, key_pos), rope_key_heads=cfg.rope_key_heads,
                         scale=scale)
        out = out.astype(self.dtype).reshape(b, t, h * cfg.v_head_dim)
        return dense(cfg.hidden_size, use_bias=cfg.attention_bias, name="o_proj")(out), cache


class MLADecoderLayer(nn.Module):
    """Pre-norm residual block: MLA then the SwiGLU MLP."""

    cfg: MLAConfig
    layer: int
    dtype: jnp.dtype
    attention: MLAPath

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 cache: C) -> tuple[jax.Array, C]:
        cfg = self.cfg
        norm = partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=self.dtype)
        h, cache = MLAttention(cfg, self.layer, self.dtype, self.attention, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, positions, cache)
        x = x + h
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, name="mlp")
        return x + mlp(norm(name="post_attention_layernorm")(x)), cache


class MLADecoder(nn.Module):
    """The whole MLA model. ``dtype`` is both the parameter and the compute dtype;
    ``attention`` picks the computation, "naive" or "absorbed" (the same function)."""

    cfg: MLAConfig
    dtype: jnp.dtype = jnp.float32
    attention: MLAPath = "absorbed"

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: C,
                 logit_index: jax.Array | None = None) -> tuple[jax.Array, C]:
        """Run one step.

        Args:
          tokens: int32 [B, T] token ids.
          positions: int32 [B, T] absolute positions; -1 marks padding.
          cache: a latent cache pytree (``kvjax.cache.LatentKVCache``: ``LatentCache`` or
            ``NoCache``).
          logit_index: optional int32 [B]; if given, logits only at that index of T.

        Returns:
          float32 logits [B, T, V] (or [B, V] with ``logit_index``) and the new cache.
        """
        cfg = self.cfg
        if self.attention not in MLA_PATHS:
            raise ValueError(f"attention must be one of {MLA_PATHS}, got {self.attention!r}")
        chex.assert_rank([tokens, positions], 2)
        chex.assert_equal_shape([tokens, positions])
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                         param_dtype=self.dtype, name="embed_tokens")
        x = embed(tokens)
        cos, sin = rope_tables(cfg, positions)
        for i in range(cfg.num_layers):
            x, cache = MLADecoderLayer(cfg, i, self.dtype, self.attention, name=f"layers_{i}")(
                x, cos, sin, positions, cache)
        cache = cache.advance(positions)  # type: ignore[attr-defined]
        logits = output_logits(x, embed, logit_index, eps=cfg.rms_norm_eps,
                               tie_word_embeddings=cfg.tie_word_embeddings, dtype=self.dtype)
        return logits, cache
