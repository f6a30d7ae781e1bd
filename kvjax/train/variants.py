"""Attention variants of one base shape, at a matched parameter budget.

A variant is named ``mha``, ``gqa-G`` (G K/V heads, i.e. G groups of query heads), ``mqa``
or ``mla-R`` (multi-head latent attention with latent width R). All share the base
shape's vocabulary, width, depth and query heads; what the attention saves (or costs) in
parameters is given back to the SwiGLU MLP: :func:`match_budget` picks the MLP width
whose total parameter count, by the project's counter
(:func:`kvjax.analysis.sizing.param_count`), is nearest the target.

MLA variants are DeepSeek-style: one shared RoPE key head of ``mla_rope_head_dim``, a
RMSNorm on the latent, per-head non-RoPE q/k and values of ``head_dim``, plain
``q_proj``; RoPE pairs (i, i + d/2) (``rope_interleave=False``, DeepSeek-V3's other
layout), so a checkpoint saves as ``deepseek_v3``.
"""

from __future__ import annotations

import dataclasses
import re

from kvjax.analysis.sizing import param_count
from kvjax.analysis.spec import ArchSpec
from kvjax.config import ModelConfig
from kvjax.mla_config import MLAConfig

AnyConfig = ModelConfig | MLAConfig
_NAME = re.compile(r"^(mha|mqa|gqa-(\d+)|mla-(\d+))$")


@dataclasses.dataclass(frozen=True)
class BaseShape:
    """What every variant of a sweep shares."""

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # residual stream width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    head_dim: int  # width of one query head (and K/V head; MLA: non-RoPE q/k and v)
    intermediate_size: int  # MLP width of the MHA model, which sets the default budget
    max_position_embeddings: int  # longest context
    mla_rope_head_dim: int = 8  # MLA: width of the shared RoPE key head (even)
    rope_theta: float = 10000.0  # RoPE base


@dataclasses.dataclass(frozen=True)
class Variant:
    """One attention variant: ``kv_heads`` for MHA/GQA/MQA, ``kv_lora_rank`` for MLA."""

    name: str
    kv_heads: int | None
    kv_lora_rank: int | None

    @classmethod
    def parse(cls, name: str, num_heads: int) -> Variant:
        """``mha`` / ``gqa-G`` / ``mqa`` / ``mla-R`` for a model of ``num_heads`` query heads
        (ValueError naming a bad name or a G that does not divide ``num_heads``)."""
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"unknown variant {name!r}; expected mha, gqa-G, mqa or mla-R")
        if m.group(3) is not None:
            rank = int(m.group(3))
            if rank < 1:
                raise ValueError(f"variant {name!r}: the latent rank must be positive")
            return cls(name, None, rank)
        kv = {"mha": num_heads, "mqa": 1}.get(name) or int(m.group(2))
        if kv < 1 or num_heads % kv:
            raise ValueError(f"variant {name!r}: {kv} K/V heads must divide {num_heads} heads")
        return cls(name, kv, None)


def build_config(variant: Variant, shape: BaseShape, intermediate_size: int) -> AnyConfig:
    """The runnable config of ``variant`` with MLP width ``intermediate_size``."""
    if variant.kv_lora_rank is not None:
        return MLAConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
            intermediate_size=intermediate_size, num_layers=shape.num_layers,
            num_heads=shape.num_heads, kv_lora_rank=variant.kv_lora_rank,
            qk_nope_head_dim=shape.head_dim, qk_rope_head_dim=shape.mla_rope_head_dim,
            v_head_dim=shape.head_dim, rope_interleave=False, rope_theta=shape.rope_theta,
            max_position_embeddings=shape.max_position_embeddings)
    assert variant.kv_heads is not None
    return ModelConfig(
        family="llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=intermediate_size, num_layers=shape.num_layers,
        num_heads=shape.num_heads, num_kv_heads=variant.kv_heads, head_dim=shape.head_dim,
        rope_theta=shape.rope_theta, max_position_embeddings=shape.max_position_embeddings)


def count_params(cfg: AnyConfig) -> int:
    """Stored parameters of the model ``cfg`` describes."""
    return param_count(ArchSpec.from_config(cfg, "count"))


def match_budget(variant: Variant, shape: BaseShape, target_params: int, *, multiple: int = 1,
                 tolerance: float = 0.05) -> AnyConfig:
    """``variant``'s config with the MLP width (a multiple of ``multiple``) whose parameter
    count is nearest ``target_params``.

    The count is affine in the MLP width, so two evaluations of the counter give the
    slope. ValueError if the nearest count is off by more than ``tolerance`` (relative),
    e.g. when the attention and embeddings alone exceed the target.
    """
    if multiple < 1 or target_params < 1:
        raise ValueError("multiple and target_params must be positive")
    p1 = count_params(build_config(variant, shape, multiple))
    slope = (count_params(build_config(variant, shape, 2 * multiple)) - p1) / multiple
    width = max(multiple, multiple * round((target_params - p1) / slope / multiple + 1))
    cfg = build_config(variant, shape, width)
    error = abs(count_params(cfg) - target_params) / target_params
    if error > tolerance:
        raise ValueError(f"variant {variant.name!r}: nearest parameter count "
                         f"{count_params(cfg)} (MLP width {width}) is {error:.1%} from the "
                         f"target {target_params} (tolerance {tolerance:.0%})")
    return cfg
