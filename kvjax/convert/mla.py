"""MHA/GQA -> MLA by low-rank factorisation of the K/V projections (SVD), RoPE part kept.

A Llama-family attention layer has, per K/V head ``g``, keys ``RoPE(x W_k_g)`` and values
``x W_v_g`` (head width D). The conversion (in the spirit of MHA2MLA, Ji et al. 2025, and
TransMLA, Meng et al. 2025) writes it as MLA (:mod:`kvjax.models.mla`):

* RoPE part, kept exactly: the ``rope_dim / 2`` highest-frequency RoPE pairs of every key
  head, i.e. dims ``[0, p)`` and ``[D/2, D/2 + p)`` with ``p = rope_dim / 2``, become the
  decoupled RoPE key heads (``rope_key_heads = num_kv_heads``, cached uncompressed). In
  an MLA RoPE table of width ``rope_dim`` with base ``theta ** (rope_dim / D)`` pair ``i``
  turns at ``theta ** (-2 i / D)``: exactly the original frequency of pair ``i``.
* Compressed part: the remaining key dims (which lose RoPE; none when ``rope_dim = D``)
  and the values. Their projections side by side, ``M = [W_k_nope | W_v]`` of shape
  [hidden, K * (D - rope_dim) + K * D], are factorised by truncated SVD,
  ``M ~= (U_r S_r^1/2)(S_r^1/2 V_r^T)``: the first factor is the latent down-projection
  (part of ``kv_a_proj_with_mqa``), the second the up-projection ``kv_b_proj``, its
  per-head blocks repeated for the query heads of each group. The cache holds
  ``r + K * rope_dim`` values per token and layer instead of ``2 * K * D``.

Queries are split the same way, ``o_proj`` is unchanged (``v_head_dim = D``), the latent
has no RMSNorm (``latent_norm=False``; a norm could not reproduce the original) and the
softmax scale stays ``D ** -0.5``. At full rank and ``rope_dim = D`` the converted model
computes the original function; below full rank the error is that of the truncated SVD,
reported as ``||M - M_r||_F / ||M||_F`` per layer. ``rope_dim < D`` also drops RoPE from
the other pairs, a change of function the SVD error does not measure (MHA2MLA fine-tunes
after it). The SVD is of the weights alone, not weighted by activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.mla_config import MLAConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MLAConversion:
    """A converted model and how well its latent reproduces the original K/V projections."""

    config: MLAConfig
    params: Params  # MLADecoder parameters, in the original parameters' dtype
    errors: tuple[float, ...]  # per layer: ||M - M_r||_F / ||M||_F (float64)
    full_rank: int  # the rank of M at which conversion is exact (min(hidden, M's columns))


def low_rank_factors(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD ``m ~= down @ up`` in float64.

    m [n, k] -> down [n, rank], up [rank, k] (the singular values split evenly between
    them) and the relative Frobenius error ``||m - down @ up||_F / ||m||_F``.
    """
    full = min(m.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an integer in [1, {full}], got {rank!r}")
    m = np.asarray(m, np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank])
    down, up = u[:, :rank] * root, root[:, None] * vt[:rank]
    error = float(np.linalg.norm(m - down @ up) / np.linalg.norm(m))
    return down, up, error


def _rope_split(head_dim: int, rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (within a rotate-half head) of the kept RoPE dims and of the others."""
    half, p = head_dim // 2, rope_dim // 2
    rope = np.r_[0:p, half:half + p]
    nope = np.r_[p:half, half + p:head_dim]
    return rope, nope


def _kernel(w: np.ndarray, rows: int, dtype: Any) -> dict[str, jnp.ndarray]:
    """A Dense layer's parameters: ``w`` as a [rows, -1] kernel in ``dtype``."""
    return {"kernel": jnp.asarray(w.reshape(rows, -1), dtype=dtype)}


def to_mla(cfg: ModelConfig, params: Params, kv_lora_rank: int,
           rope_dim: int | None = None) -> MLAConversion:
    """Convert a bias-free Llama-family model (``Decoder`` parameters) to MLA.

    Args:
      cfg, params: the source model.
      kv_lora_rank: latent width r, 1 <= r <= ``full_rank``.
      rope_dim: RoPE dims kept per key head (even, 2 <= rope_dim <= head_dim); default
        head_dim, the exact conversion.
    """
    if cfg.qkv_bias or cfg.o_bias:
        raise ValueError("conversion to MLA needs bias-free attention "
                         f"(qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias})")
    d, kv, h = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    dr = d if rope_dim is None else rope_dim
    if isinstance(dr, bool) or not isinstance(dr, int) or dr % 2 or not 2 <= dr <= d:
        raise ValueError(f"rope_dim must be even and in [2, head_dim={d}], got {rope_dim!r}")
    dn = d - dr
    full_rank = min(cfg.hidden_size, kv * (dn + d))
    rope_idx, nope_idx = _rope_split(d, dr)
    heads_kv = np.arange(h) // cfg.group_size  # the K/V head each query head reads

    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    errors = []
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"]
        attn = layer["self_attn"]
        dtype = attn["q_proj"]["kernel"].dtype
        wq, wk, wv = (np.asarray(attn[n]["kernel"], np.float64).reshape(cfg.hidden_size, -1, d)
                      for n in ("q_proj", "k_proj", "v_proj"))
        m = np.concatenate([wk[..., nope_idx].reshape(cfg.hidden_size, -1),
                            wv.reshape(cfg.hidden_size, -1)], axis=1)
        down, up, error = low_rank_factors(m, kv_lora_rank)
        errors.append(error)
        up_k = up[:, : kv * dn].reshape(kv_lora_rank, kv, dn)
        up_v = up[:, kv * dn:].reshape(kv_lora_rank, kv, d)
        w_kvb = np.concatenate([up_k[:, heads_kv], up_v[:, heads_kv]], axis=-1)
        w_q = np.concatenate([wq[..., nope_idx], wq[..., rope_idx]], axis=-1)
        w_kva = np.concatenate([down, wk[..., rope_idx].reshape(cfg.hidden_size, -1)], axis=1)
        out[f"layers_{i}"] = {
            **{k: v for k, v in layer.items() if k != "self_attn"},
            "self_attn": {"q_proj": _kernel(w_q, cfg.hidden_size, dtype),
                          "kv_a_proj_with_mqa": _kernel(w_kva, cfg.hidden_size, dtype),
                          "kv_b_proj": _kernel(w_kvb, kv_lora_rank, dtype),
                          "o_proj": attn["o_proj"]},
        }
    mla = MLAConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=h,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=d,
        rope_key_heads=kv, latent_norm=False, rope_interleave=False,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta ** (dr / d),
        rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_ids=cfg.eos_token_ids)
    return MLAConversion(config=mla, params=out, errors=tuple(errors), full_rank=full_rank)
