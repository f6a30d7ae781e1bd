"""Model configuration, parsed in one place from Hugging Face ``config.json``.

Only the Llama and Qwen2 decoder families are read. Every key of a
``config.json`` is either used, or listed as not affecting inference math, or
rejected: a key we do not know could change the math, so it is an error that
names it rather than something silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal, Protocol

Family = Literal["llama", "qwen2"]


class ConfigError(ValueError):
    """A configuration is malformed or asks for something kvjax does not implement."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float  # divisor applied to low frequencies
    low_freq_factor: float  # wavelengths above original_len / low_freq_factor are scaled fully
    high_freq_factor: float  # wavelengths below original_len / high_freq_factor are left alone
    original_max_position_embeddings: int  # context length the base model was trained on


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama/Qwen2-family decoder-only transformer."""

    family: Family  # "llama" (q/k/v/o bias together) or "qwen2" (q/k/v bias, none on o)
    vocab_size: int  # rows of the embedding table
    hidden_size: int  # residual stream width
    intermediate_size: int  # SwiGLU hidden width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; divides num_heads (1 = MQA, num_heads = MHA)
    head_dim: int  # width of one head
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Llama3RopeScaling | None = None  # None = plain RoPE
    max_position_embeddings: int = 2048  # longest context the model accepts
    qkv_bias: bool = False  # bias on the q/k/v projections
    o_bias: bool = False  # bias on the output projection
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    bos_token_id: int | None = None  # beginning-of-sequence id, if the model has one
    eos_token_ids: tuple[int, ...] = ()  # ids that end generation by default

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def group_size(self) -> int:
        """Query heads that share one K/V head."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the whole head."""
        return self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse the contents of a Hugging Face ``config.json`` (Llama or Qwen2)."""
        return _parse_hf(raw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a local checkpoint directory."""
        return _parse_hf(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a local checkpoint directory (ConfigError if absent
    or not JSON)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"no config.json in {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return raw


# Keys that describe training, bookkeeping or tooling and never change inference math.
IGNORED_KEYS = frozenset({
    "architectures", "attention_dropout", "auto_map", "dtype", "torch_dtype",
    "initializer_range", "model_type", "pad_token_id", "transformers_version", "use_cache",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "tie_encoder_decoder", "torchscript", "use_return_dict",
    "max_window_layers", "_attn_implementation_autoset", "name_or_path", "cache_implementation",
})

_ROPE_KEYS_LLAMA3 = {"factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"}


def parse_rope(raw: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling from either the v4 (`rope_theta` + `rope_scaling`) or the
    v5 (`rope_parameters`) spelling."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling")
    if scaling:
        params = {**params, **scaling}
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float):
        raise ConfigError(f"rope_theta must be a number, got {theta!r}")
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("rope_parameters.partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        if params:
            raise ConfigError(f"rope_parameters: unsupported keys {sorted(params)} for default RoPE")
        return float(theta), None
    if rope_type == "llama3":
        missing = _ROPE_KEYS_LLAMA3 - params.keys()
        if missing:
            raise ConfigError(f"rope_scaling: llama3 scaling is missing {sorted(missing)}")
        extra = params.keys() - _ROPE_KEYS_LLAMA3
        if extra:
            raise ConfigError(f"rope_scaling: unsupported keys {sorted(extra)}")
        scale = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
        if scale.high_freq_factor <= scale.low_freq_factor:
            raise ConfigError("rope_scaling: high_freq_factor must exceed low_freq_factor")
        return float(theta), scale
    raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported "
                      "(supported: default, llama3)")


class HFFields:
    """Reads a ``config.json`` dict and remembers every key read, so that the keys left
    over (neither read nor in ``IGNORED_KEYS``) can be rejected by name."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.used: set[str] = set()

    def take(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        """The value of ``key``; ``default`` when absent or null (ConfigError if none)."""
        self.used.add(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is dataclasses.MISSING:
            raise ConfigError(f"config.json is missing required field {key!r}")
        return default

    def require(self, key: str, allowed: tuple[Any, ...]) -> None:
        """A field that must hold one of ``allowed`` (or be absent) for our math to be the
        model's math."""
        self.used.add(key)
        if key in self.raw and self.raw[key] is not None and self.raw[key] not in allowed:
            raise ConfigError(f"{key}={self.raw[key]!r} is not supported (supported: {allowed})")

    def mark(self, *keys: str) -> None:
        """Keys read by other means (e.g. ``parse_rope``) or known not to matter here."""
        self.used.update(keys)

    def reject_unknown(self) -> None:
        """ConfigError naming every key neither read nor in ``IGNORED_KEYS``."""
        unknown = sorted(set(self.raw) - self.used - IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"config.json has fields kvjax does not understand: {unknown}; "
                              "they may change the model's math, so they are not ignored")

    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` (one id or a list) as a tuple."""
        eos = self.take("eos_token_id", [])
        return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _parse_hf(raw: dict[str, Any]) -> ModelConfig:
    family = raw.get("model_type")
    if family not in ("llama", "qwen2"):
        raise ConfigError(f"model_type={family!r} is not supported (supported: llama, qwen2)")
    f = HFFields(raw)
    f.require("hidden_act", ("silu",))
    f.require("mlp_bias", (False,))
    f.require("pretraining_tp", (1,))
    f.require("use_sliding_window", (False,))
    f.require("attn_logit_softcapping", ())
    f.require("final_logit_softcapping", ())
    f.mark("sliding_window")  # only used when use_sliding_window is true, which we reject
    layer_types = f.take("layer_types", [])
    bad_layers = sorted({t for t in layer_types if t != "full_attention"})
    if bad_layers:
        raise ConfigError(f"layer_types contains {bad_layers}; only full_attention is supported")

    hidden = int(f.take("hidden_size"))
    heads = int(f.take("num_attention_heads"))
    head_dim = int(f.take("head_dim", hidden // heads if heads else 0))
    theta, scaling = parse_rope(raw)
    f.mark("rope_theta", "rope_scaling", "rope_parameters")
    attention_bias = bool(f.take("attention_bias", False))

    cfg = ModelConfig(
        family=family,
        vocab_size=int(f.take("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(f.take("intermediate_size")),
        num_layers=int(f.take("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(f.take("num_key_value_heads", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(f.take("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(f.take("max_position_embeddings", 2048)),
        # Qwen2 always has q/k/v bias and never an o bias; Llama's attention_bias covers all four.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        tie_word_embeddings=bool(f.take("tie_word_embeddings", False)),
        bos_token_id=f.take("bos_token_id", None),
        eos_token_ids=f.eos_token_ids(),
    )
    f.reject_unknown()
    return cfg


class RopeSpec(Protocol):
    """What a RoPE table depends on (``ModelConfig``, ``MLAConfig``)."""

    @property
    def rope_dim(self) -> int: ...  # width RoPE rotates (even)
    @property
    def rope_theta(self) -> float: ...  # RoPE base
    @property
    def rope_scaling(self) -> Llama3RopeScaling | None: ...  # None = plain RoPE


def rope_inv_freq(cfg: RopeSpec) -> list[float]:
    """Per-pair RoPE inverse frequencies (length rope_dim // 2), with scaling applied.

    Computed in float64 on the host so the table is the same on every backend.
    """
    dim = cfg.rope_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
