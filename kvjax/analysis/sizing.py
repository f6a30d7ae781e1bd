"""KV-cache and weight sizing: bytes per token, totals, exact parameter counts, crossover.

Byte counts are exact for the raw tensors: quantization scales/zero-points of the
fp8/int8/int4 formats are not included. Sub-byte formats are packed (two int4 values per
byte) and a total is rounded up to whole bytes only once, at the end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kvjax.analysis import layers
from kvjax.analysis.spec import ArchSpec

# Bits per element of each storage dtype (bytes = bits / 8; int4 = 0.5 byte).
DTYPE_BITS: dict[str, int] = {
    "fp32": 32,
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
}


# The storage dtype of each array dtype name (``numpy.dtype(x).name``) a cache can hold.
ARRAY_DTYPES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                                "int8": "int8"}


def storage_dtype(array_dtype: Any) -> str:
    """The sizing name ("fp32", "bf16", ...) of a NumPy/JAX dtype; ValueError if none."""
    name = np.dtype(array_dtype).name
    if name not in ARRAY_DTYPES:
        raise ValueError(f"no storage dtype for arrays of {name} (known: "
                         f"{', '.join(ARRAY_DTYPES)})")
    return ARRAY_DTYPES[name]


def dtype_bits(dtype: str) -> int:
    """Bits per element of ``dtype`` (case-insensitive); ValueError naming it if unknown."""
    try:
        return DTYPE_BITS[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})") from None


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype`` (int4 = 0.5)."""
    return dtype_bits(dtype) / 8


def _bytes(elements: int, dtype: str) -> int:
    """Whole bytes holding ``elements`` values of ``dtype`` (rounded up once)."""
    return math.ceil(elements * dtype_bits(dtype) / 8)


def kv_elements_per_token_per_layer(spec: ArchSpec) -> int:
    """Values cached per token per layer.

    MHA/GQA/MQA: a key and a value per KV head, ``2 * num_kv_heads * head_dim``.
    MLA: one compressed latent plus the decoupled RoPE key, ``kv_lora_rank +
    rope_key_heads * qk_rope_head_dim`` (DeepSeek: one RoPE key head).
    """
    if spec.mla is not None:
        return spec.mla.cached_width
    return 2 * spec.num_kv_heads * spec.head_dim


def kv_elements_per_token(spec: ArchSpec) -> int:
    """Values cached per token, all layers."""
    return spec.num_layers * kv_elements_per_token_per_layer(spec)


def kv_bytes_per_token(spec: ArchSpec, dtype: str) -> int:
    """Bytes of KV cache one token adds, all layers."""
    return _bytes(kv_elements_per_token(spec), dtype)


def cached_tokens(spec: ArchSpec, seq_len: int) -> int:
    """Tokens a sequence of ``seq_len`` keeps in cache (a sliding window caps it)."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be non-negative, got {seq_len}")
    return seq_len if spec.sliding_window is None else min(seq_len, spec.sliding_window)


def kv_bytes(spec: ArchSpec, dtype: str, batch: int, seq_len: int) -> int:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens each."""
    if batch < 0:
        raise ValueError(f"batch must be non-negative, got {batch}")
    return _bytes(batch * cached_tokens(spec, seq_len) * kv_elements_per_token(spec), dtype)


def param_count(spec: ArchSpec) -> int:
    """Exact number of stored parameters (a tied LM head is counted once)."""
    return _count(spec, active=False)


def active_param_count(spec: ArchSpec) -> int:
    """Parameters one token touches: as :func:`param_count`, but only top-k routed experts.

    The embedding table is counted in full, as in :func:`param_count` and in the usual
    published "active parameters" figures.
    """
    return _count(spec, active=True)


def _count(spec: ArchSpec, *, active: bool) -> int:
    total = layers.embedding_params(spec) + layers.final_norm_params(spec)
    if not spec.tie_word_embeddings:
        total += layers.head_matmul(spec).params
    for layer in range(spec.num_layers):
        total += sum(m.active_params if active else m.params
                     for m in layers.layer_matmuls(spec, layer))
        total += layers.layer_vector_params(spec)
    return total


def weight_bytes(spec: ArchSpec, dtype: str) -> int:
    """Bytes of all weights stored in ``dtype``."""
    return _bytes(param_count(spec), dtype)


def max_batch(spec: ArchSpec, kv_dtype: str, weight_dtype: str, budget_bytes: int,
              seq_len: int) -> int:
    """Most sequences of ``seq_len`` tokens whose KV cache fits in ``budget_bytes`` beside
    the weights: the largest ``B`` with ``weight_bytes + kv_bytes(B, seq_len) <=
    budget_bytes`` (0 when the weights alone do not fit). Activations and workspace are
    not counted."""
    if seq_len <= 0 or budget_bytes < 0:
        raise ValueError(f"seq_len must be positive and budget_bytes non-negative, got "
                         f"{seq_len}, {budget_bytes}")
    free_bits = 8 * (budget_bytes - weight_bytes(spec, weight_dtype))
    per_seq_bits = cached_tokens(spec, seq_len) * kv_elements_per_token(spec) * dtype_bits(kv_dtype)
    return max(0, free_bits // per_seq_bits)


def crossover_tokens(spec: ArchSpec, kv_dtype: str, weight_dtype: str, batch: int) -> int | None:
    """Smallest context length at which ``batch`` sequences' KV cache exceeds the weights.

    Returns the least ``T`` with ``kv_bytes(spec, kv_dtype, batch, T) > weight_bytes``, or
    None when a sliding window caps the cache below the weights forever.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    weights = weight_bytes(spec, weight_dtype)
    # Work in bits so int4 (half a byte) stays exact: batch*T*elements*bits > 8*weights.
    per_token_bits = batch * kv_elements_per_token(spec) * dtype_bits(kv_dtype)
    tokens = (8 * weights) // per_token_bits + 1
    if spec.sliding_window is not None and tokens > spec.sliding_window:
        return None
    return tokens


@dataclasses.dataclass(frozen=True)
class SizingReport:
    """KV-cache and weight footprint of one model at one batch size and context length."""

    name: str  # model name
    attention: str  # "mha-family" or "mla"
    kv_dtype: str  # storage dtype of the KV cache
    weight_dtype: str  # storage dtype of the weights
    batch: int  # concurrent sequences
    seq_len: int  # tokens per sequence
    num_layers: int  # decoder blocks
    kv_elements_per_token_per_layer: int  # values cached per token per layer
    kv_bytes_per_token_per_layer: float  # bytes per token per layer (int4 may be fractional)
    kv_bytes_per_token: int  # bytes per token, all layers
    cached_tokens_per_sequence: int  # seq_len, capped by a sliding window
    kv_bytes_total: int  # batch * cached tokens * per-token bytes
    param_count: int  # stored parameters
    active_param_count: int  # parameters one token touches (differs for MoE)
    weight_bytes: int  # bytes of all weights
    total_bytes: int  # weights + KV cache
    kv_to_weight_ratio: float  # kv_bytes_total / weight_bytes
    crossover_tokens: int | None  # context where batch * KV exceeds weights (None: never)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict of every field."""
        return dataclasses.asdict(self)


def size_report(spec: ArchSpec, dtype: str = "bf16", weight_dtype: str | None = None,
                batch: int = 1, seq_len: int | None = None) -> SizingReport:
    """Bundle the sizing figures for ``spec``.

    ``dtype`` is the KV-cache dtype; ``weight_dtype`` defaults to it. ``seq_len`` defaults
    to the model's maximum context.
    """
    weight_dtype = (weight_dtype or dtype).lower()
    dtype = dtype.lower()
    dtype_bits(dtype)
    dtype_bits(weight_dtype)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    seq = spec.max_context_len if seq_len is None else seq_len
    if seq <= 0:
        raise ValueError(f"seq_len must be positive, got {seq}")
    kv_total = kv_bytes(spec, dtype, batch, seq)
    weights = weight_bytes(spec, weight_dtype)
    per_layer = kv_elements_per_token_per_layer(spec)
    return SizingReport(
        name=spec.name,
        attention=spec.attention,
        kv_dtype=dtype,
        weight_dtype=weight_dtype,
        batch=batch,
        seq_len=seq,
        num_layers=spec.num_layers,
        kv_elements_per_token_per_layer=per_layer,
        kv_bytes_per_token_per_layer=per_layer * dtype_bytes(dtype),
        kv_bytes_per_token=kv_bytes_per_token(spec, dtype),
        cached_tokens_per_sequence=cached_tokens(spec, seq),
        kv_bytes_total=kv_total,
        param_count=param_count(spec),
        active_param_count=active_param_count(spec),
        weight_bytes=weights,
        total_bytes=weights + kv_total,
        kv_to_weight_ratio=kv_total / weights,
        crossover_tokens=crossover_tokens(spec, dtype, weight_dtype, batch),
    )
