"""The decode step of ``kvjax.models.llama.Decoder`` over a paged cache, as fused Triton
kernels (GPU; CPU tests run them in Triton's interpreter).

One new token per sequence. Per layer: ``norm_qkv_rope`` (input RMSNorm, q/k/v, bias,
RoPE; packed), ``triton_paged_decode_append_packed`` (the K/V write and the attention),
``matmul_residual`` (o projection + residual), ``norm_gate_up`` (post-attention RMSNorm,
gate/up, SiLU x up), ``matmul_residual`` (down projection + residual): five launches and
the split combine, where XLA makes twelve of the Flax layer (docs/serving-engine.md).
The embedding, final norm and LM head stay in XLA. The function reads the Flax
parameter tree of ``Decoder`` (``layers_i/self_attn/q_proj/kernel``, ...), so the same
checkpoint serves both paths; the serving engine selects it with
``fused_decode=True``.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.models.llama import rms_norm, rope_tables
from pallas_kernels.triton_fused_layer import matmul_residual, norm_gate_up, norm_qkv_rope
from pallas_kernels.triton_paged_decode import triton_paged_decode_append_packed

O_PROJ_BLOCK_N = 16  # the o projection's column tile (fastest in the H100 sweep; the down
# projection keeps matmul_residual's default)


def check_fusable(cfg: ModelConfig) -> None:
    """ValueError unless the fused kernels cover ``cfg``: a head_dim that is a power of
    two >= 32 (RoPE's halves are mma tiles of >= 16 columns)."""
    if cfg.head_dim < 32 or cfg.head_dim & (cfg.head_dim - 1):
        raise ValueError(f"fused decode needs head_dim a power of two >= 32, got "
                         f"{cfg.head_dim}")


def _bias(module: dict[str, Any]) -> jax.Array | None:
    return module.get("bias")


def fused_decode_step(params: Any, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                      k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode forward of ``Decoder(cfg)`` with ``params`` over a paged pool.

    Args:
      params: the Decoder's parameter tree (``variables["params"]``), one dtype.
      tokens: int32 [B] this step's token per sequence.
      positions: int32 [B] its position; -1 for a padding row (nothing written, zero
        attention; its logits are meaningless).
      k_pages, v_pages: [L, P, S, K, D] the pool, in the parameters' dtype.
      block_tables: int32 [B, M].

    Returns:
      (float32 logits [B, V], k_pages, v_pages with this step's K/V written) — what
      ``Decoder.apply`` returns for ``tokens[:, None]`` at ``positions[:, None]`` with a
      ``PagedCache`` (``logit_index`` 0), up to rounding.

    Raises:
      ValueError: when ``check_fusable`` rejects ``cfg``, or on the kernels' argument
        checks.
    """
    check_fusable(cfg)
    chex.assert_rank([tokens, positions, block_tables], [1, 1, 2])
    chex.assert_equal_shape([tokens, positions])
    embedding = params["embed_tokens"]["embedding"]
    x = embedding[tokens]  # [B, E]
    cos, sin = rope_tables(cfg, positions[:, None])  # [B, 1, D], halves repeated
    half = cfg.head_dim // 2
    cos, sin = cos[:, 0, :half], sin[:, 0, :half]
    lengths = jnp.where(positions >= 0, positions + 1, 0)
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_layers):
        p = params[f"layers_{i}"]
        attn, mlp = p["self_attn"], p["mlp"]
        qkv = norm_qkv_rope(
            x, p["input_layernorm"]["weight"], attn["q_proj"]["kernel"],
            attn["k_proj"]["kernel"], attn["v_proj"]["kernel"], _bias(attn["q_proj"]),
            _bias(attn["k_proj"]), _bias(attn["v_proj"]), cos, sin, head_dim=cfg.head_dim,
            eps=eps)
        out, k_pages, v_pages = triton_paged_decode_append_packed(
            qkv, k_pages, v_pages, block_tables, lengths, layer=i)
        x = matmul_residual(out.reshape(x.shape[0], -1), attn["o_proj"]["kernel"],
                            _bias(attn["o_proj"]), x, block_n=O_PROJ_BLOCK_N)
        h = norm_gate_up(x, p["post_attention_layernorm"]["weight"],
                         mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"], eps=eps)
        x = matmul_residual(h, mlp["down_proj"]["kernel"], None, x)
    x = rms_norm(x, params["norm"]["weight"], eps)
    head = embedding.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.dot(x, head).astype(jnp.float32), k_pages, v_pages
