"""The decode step of ``kvjax.models.llama.Decoder`` over a paged cache, as fused Triton
kernels (GPU; CPU tests run them in Triton's interpreter).

One new token per sequence. Per layer: ``norm_qkv_rope`` (input RMSNorm, q/k/v, bias,
RoPE; packed), ``triton_paged_decode_append_packed`` (the K/V write and the attention),
``matmul_residual`` (o projection + residual), ``norm_gate_up`` (post-attention RMSNorm,
gate/up, SiLU x up), ``matmul_residual`` (down projection + residual): five launches and
the split combine, where XLA makes twelve of the Flax layer (docs/serving-engine.md).
The embedding, final norm and LM head stay in XLA. ``FusedLaunch`` says how each of
the four layer pieces runs: a Triton kernel with given launch settings, or ``"xla"``
(the same math as the kernel's jnp reference, left to XLA's fusions), so a step can take
the faster form of each piece as measured (``benchmarks/fused_layer_kernels.py
--launch-out`` writes one). The function reads the Flax parameter tree of ``Decoder``
(``layers_i/self_attn/q_proj/kernel``, ...), so the same checkpoint serves both paths;
the serving engine selects it with ``fused_decode=True``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.models.llama import rms_norm, rope_tables
from pallas_kernels.triton_fused_layer import (
    matmul_residual,
    matmul_residual_reference,
    norm_gate_up,
    norm_gate_up_reference,
    norm_qkv_rope,
    norm_qkv_rope_reference,
)
from pallas_kernels.triton_paged_decode import triton_paged_decode_append_packed

O_PROJ_BLOCK_N = 16  # the o projection's column tile (fastest in the H100 sweep; the down
# projection keeps matmul_residual's default)
XLA = "xla"  # a piece left to XLA (FusedLaunch)
_MATMUL_KEYS = frozenset({"block_n", "block_k", "split_k", "num_warps", "num_stages"})
PIECE_KEYS: dict[str, frozenset[str]] = {  # each piece's kernel keywords
    "qkv": frozenset({"block_k", "split_k", "num_warps", "num_stages"}),  # norm_qkv_rope
    "o_proj": _MATMUL_KEYS,  # matmul_residual
    "gate_up": frozenset({"block_n", "block_k", "num_warps", "num_stages"}),  # norm_gate_up
    "down": _MATMUL_KEYS,  # matmul_residual
}
Piece = tuple[tuple[str, int], ...] | str  # sorted (keyword, value) pairs, or XLA


def _piece(name: str, value: object) -> Piece:
    """``value`` ("xla", or a mapping of kernel keyword -> int) as a hashable piece."""
    if value == XLA:
        return XLA
    if isinstance(value, list | tuple):  # (keyword, value) pairs, as dataclasses.asdict gives
        try:
            value = dict(value)
        except (TypeError, ValueError):
            raise ValueError(f"fused launch {name!r}: expected (keyword, value) pairs, got "
                             f"{value!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"fused launch {name!r}: expected {XLA!r} or a mapping of launch "
                         f"settings, got {value!r}")
    unknown = set(value) - PIECE_KEYS[name]
    if unknown:
        raise ValueError(f"fused launch {name!r}: unknown settings {sorted(unknown)}; "
                         f"known: {sorted(PIECE_KEYS[name])}")
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"fused launch {name!r}: {key} must be an int >= 1, got {v!r}")
    return tuple(sorted(value.items()))


@dataclasses.dataclass(frozen=True)
class FusedLaunch:
    """How each piece of a fused decode layer runs (hashable: a jit static argument).

    Each field is ``"xla"`` (the piece's jnp reference, compiled by XLA) or the Triton
    kernel's launch settings as sorted ``(keyword, int)`` pairs (empty: the kernel's
    defaults); a mapping is accepted and frozen. Pieces and their kernels: ``qkv``
    ``norm_qkv_rope``; ``o_proj`` and ``down`` ``matmul_residual``; ``gate_up``
    ``norm_gate_up``. The kernels check the values themselves when they launch.
    """

    qkv: Piece = ()
    o_proj: Piece = (("block_n", O_PROJ_BLOCK_N),)
    gate_up: Piece = ()
    down: Piece = ()

    def __post_init__(self) -> None:
        for name in PIECE_KEYS:
            object.__setattr__(self, name, _piece(name, getattr(self, name)))

    def settings(self, name: str) -> dict[str, Any] | None:
        """The kernel keywords of piece ``name``, or None where it is left to XLA."""
        value = getattr(self, name)
        return None if value == XLA else dict(value)

    def to_dict(self) -> dict[str, Any]:
        """``{piece: "xla" | {keyword: int}}`` (JSON/YAML-ready)."""
        return {name: XLA if (st := self.settings(name)) is None else st
                for name in PIECE_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusedLaunch:
        """From ``to_dict``'s form; pieces left out keep their defaults.

        Raises:
          ValueError: on an unknown piece, an unknown keyword or a non-positive value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"fused launch must be a mapping, got {data!r}")
        unknown = set(data) - set(PIECE_KEYS)
        if unknown:
            raise ValueError(f"fused launch: unknown pieces {sorted(unknown)}; known: "
                             f"{list(PIECE_KEYS)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> FusedLaunch:
        """From a JSON file holding ``to_dict``'s form (or an object with it under
        ``"fused_launch"``, as ``fused_layer_kernels.py --launch-out`` writes)."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "fused_launch" in data:
            data = data["fused_launch"]
        return cls.from_dict(data)


def check_fusable(cfg: ModelConfig) -> None:
    """ValueError unless the fused kernels cover ``cfg``: a head_dim that is a power of
    two >= 32 (RoPE's halves are mma tiles of >= 16 columns)."""
    if cfg.head_dim < 32 or cfg.head_dim & (cfg.head_dim - 1):
        raise ValueError(f"fused decode needs head_dim a power of two >= 32, got "
                         f"{cfg.head_dim}")


def _bias(module: dict[str, Any]) -> jax.Array | None:
    return module.get("bias")


def _piece_call(kernel: Any, reference: Any, settings: dict[str, Any] | None, *args: Any,
                **kwargs: Any) -> jax.Array:
    """One layer piece: ``kernel`` at ``settings``, or its jnp ``reference`` (XLA) where
    ``settings`` is None."""
    if settings is None:
        return reference(*args, **kwargs)
    return kernel(*args, **kwargs, **settings)


def fused_decode_step(params: Any, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                      k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                      launch: FusedLaunch | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode forward of ``Decoder(cfg)`` with ``params`` over a paged pool.

    Args:
      params: the Decoder's parameter tree (``variables["params"]``), one dtype.
      tokens: int32 [B] this step's token per sequence.
      positions: int32 [B] its position; -1 for a padding row (nothing written, zero
        attention; its logits are meaningless).
      k_pages, v_pages: [L, P, S, K, D] the pool, in the parameters' dtype.
      block_tables: int32 [B, M].
      launch: how each layer piece runs (None: ``FusedLaunch()``, every piece a kernel
        at its default settings).

    Returns:
      (float32 logits [B, V], k_pages, v_pages with this step's K/V written) — what
      ``Decoder.apply`` returns for ``tokens[:, None]`` at ``positions[:, None]`` with a
      ``PagedCache`` (``logit_index`` 0), up to rounding.

    Raises:
      ValueError: when ``check_fusable`` rejects ``cfg``, or on the kernels' argument
        checks.
    """
    check_fusable(cfg)
    launch = FusedLaunch() if launch is None else launch
    qkv_st, o_st, gu_st, down_st = (launch.settings(n) for n in PIECE_KEYS)
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
        qkv = _piece_call(
            norm_qkv_rope, norm_qkv_rope_reference, qkv_st, x, p["input_layernorm"]["weight"],
            attn["q_proj"]["kernel"], attn["k_proj"]["kernel"], attn["v_proj"]["kernel"],
            _bias(attn["q_proj"]), _bias(attn["k_proj"]), _bias(attn["v_proj"]), cos, sin,
            head_dim=cfg.head_dim, eps=eps)
        out, k_pages, v_pages = triton_paged_decode_append_packed(
            qkv, k_pages, v_pages, block_tables, lengths, layer=i)
        x = _piece_call(matmul_residual, matmul_residual_reference, o_st,
                        out.reshape(x.shape[0], -1), attn["o_proj"]["kernel"],
                        _bias(attn["o_proj"]), x)
        h = _piece_call(norm_gate_up, norm_gate_up_reference, gu_st, x,
                        p["post_attention_layernorm"]["weight"], mlp["gate_proj"]["kernel"],
                        mlp["up_proj"]["kernel"], eps=eps)
        x = _piece_call(matmul_residual, matmul_residual_reference, down_st, h,
                        mlp["down_proj"]["kernel"], None, x)
    x = rms_norm(x, params["norm"]["weight"], eps)
    head = embedding.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.dot(x, head).astype(jnp.float32), k_pages, v_pages
