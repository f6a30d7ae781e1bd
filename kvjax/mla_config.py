"""Configuration of a decoder with multi-head latent attention (MLA; DeepSeek-V2, 2024).

:class:`MLAConfig` describes what :class:`kvjax.models.mla.MLADecoder` runs: DeepSeek-V2
and DeepSeek-V3 checkpoints with dense MLP layers, and models converted to MLA from
MHA/GQA checkpoints (:mod:`kvjax.convert.mla`). It is parsed from a Hugging Face
``config.json`` with the same rule as :class:`kvjax.config.ModelConfig`: every key is
used, known not to change the math, or rejected by name.

Per token and layer the cache holds ``latent_width = kv_lora_rank + rope_key_heads *
qk_rope_head_dim`` values: the compressed latent and the decoupled RoPE key. DeepSeek
has one RoPE key head shared by every query head; a converted GQA model keeps one per
original K/V head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kvjax.config import ConfigError, HFFields, Llama3RopeScaling, parse_rope, read_config_json

# Fields of the mixture-of-experts MLP (transformers and the original remote code). They
# change nothing when every layer is dense, which is all kvjax.models runs.
_MOE_KEYS = (
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "routed_scaling_factor", "n_group", "topk_group", "topk_method", "norm_topk_prob",
    "output_router_logits", "router_aux_loss_coef", "scoring_func", "aux_loss_alpha",
    "seq_aux", "moe_layer_freq", "ep_size",
)
# DeepSeek-V3's multi-token-prediction modules sit after the last layer and are used only
# for speculative decoding; the model's own logits do not depend on them.
_MTP_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")
# transformers' class defaults where a config.json may omit the field.
_FIRST_K_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}
_KV_HEADS_DEFAULT = {"deepseek_v2": None, "deepseek_v3": 128}


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Architecture of a decoder-only transformer with MLA attention and SwiGLU MLPs."""

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # residual stream width
    intermediate_size: int  # SwiGLU hidden width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    kv_lora_rank: int  # width r of the cached KV latent c_KV
    qk_nope_head_dim: int  # per-head q/k width without RoPE (keys expanded from c_KV); may be 0
    qk_rope_head_dim: int  # per-head q/k width with RoPE (keys cached); even
    v_head_dim: int  # per-head value width (values expanded from c_KV)
    q_lora_rank: int | None = None  # width of the query latent; None = plain q_proj
    rope_key_heads: int = 1  # decoupled RoPE key heads (DeepSeek: 1); divides num_heads
    latent_norm: bool = True  # RMSNorm on c_KV (DeepSeek's kv_a_layernorm)
    rope_interleave: bool = True  # RoPE pairs dims (2i, 2i+1) (DeepSeek) or (i, i + d/2)
    rms_norm_eps: float = 1e-6  # epsilon of the residual-stream RMSNorms
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Llama3RopeScaling | None = None  # None = plain RoPE
    max_position_embeddings: int = 2048  # longest context the model accepts
    attention_bias: bool = False  # bias on q_a_proj, kv_a_proj_with_mqa and o_proj
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    bos_token_id: int | None = None  # beginning-of-sequence id, if the model has one
    eos_token_ids: tuple[int, ...] = ()  # ids that end generation by default

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "rope_key_heads",
                    "max_position_embeddings")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("qk_nope_head_dim", self.qk_nope_head_dim, minimum=0)
        if self.q_lora_rank is not None:
            _check_int("q_lora_rank", self.q_lora_rank, minimum=1)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.num_heads % self.rope_key_heads:
            raise ConfigError(f"rope_key_heads={self.rope_key_heads} must divide "
                              f"num_heads={self.num_heads}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width (non-RoPE + RoPE parts)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the RoPE part of a head."""
        return self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Values cached per token and layer: c_KV and the RoPE key heads."""
        return self.kv_lora_rank + self.rope_key_heads * self.qk_rope_head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> MLAConfig:
        """Parse a DeepSeek-V2 / DeepSeek-V3 ``config.json`` (dense MLP layers only)."""
        return _parse_deepseek(raw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> MLAConfig:
        """Read ``config.json`` from a local checkpoint directory."""
        return _parse_deepseek(read_config_json(path))


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ConfigError(f"{name} must be {kind} integer, got {value!r}")


def _parse_deepseek(raw: dict[str, Any]) -> MLAConfig:
    family = raw.get("model_type")
    if family not in ("deepseek_v2", "deepseek_v3"):
        raise ConfigError(f"model_type={family!r} is not an MLA model "
                          "(supported: deepseek_v2, deepseek_v3)")
    f = HFFields(raw)
    f.require("hidden_act", ("silu",))
    f.require("mlp_bias", (False,))
    f.require("pretraining_tp", (1,))
    f.require("use_mla", (True,))
    for key in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim"):
        if key not in raw:  # transformers would fill in a large default: be explicit
            raise ConfigError(f"config.json is missing required field {key!r}")
    layers = int(f.take("num_hidden_layers"))
    first_dense = int(f.take("first_k_dense_replace", _FIRST_K_DENSE_DEFAULT[family]))
    if first_dense < layers:
        raise ConfigError(f"first_k_dense_replace={first_dense} < num_hidden_layers={layers}: "
                          f"layers {first_dense}..{layers - 1} are mixture-of-experts, which "
                          "kvjax.models does not run (only dense MLP layers)")
    f.mark(*_MOE_KEYS, *_MTP_KEYS)
    heads = int(f.take("num_attention_heads"))
    kv_heads = f.take("num_key_value_heads", _KV_HEADS_DEFAULT[family] or heads)
    if kv_heads != heads:
        raise ConfigError(f"num_key_value_heads={kv_heads} must equal num_attention_heads="
                          f"{heads}: MLA expands every query head's keys from the latent")
    nope = int(f.take("qk_nope_head_dim"))
    rope = int(f.take("qk_rope_head_dim"))
    # Derived fields transformers writes out: they must agree with the ones above.
    for key, want in (("head_dim", rope), ("qk_head_dim", nope + rope)):
        got = f.take(key, want)
        if got != want:
            raise ConfigError(f"{key}={got!r} disagrees with the MLA dims (expected {want})")
    theta, scaling = parse_rope(raw)
    f.mark("rope_theta", "rope_scaling", "rope_parameters")
    interleave = True if family == "deepseek_v2" else bool(f.take("rope_interleave", True))
    q_lora = f.take("q_lora_rank", None)
    cfg = MLAConfig(
        vocab_size=int(f.take("vocab_size")),
        hidden_size=int(f.take("hidden_size")),
        intermediate_size=int(f.take("intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        kv_lora_rank=int(f.take("kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(f.take("v_head_dim")),
        q_lora_rank=None if q_lora is None else int(q_lora),
        rope_interleave=interleave,
        rms_norm_eps=float(f.take("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(f.take("max_position_embeddings", 2048)),
        attention_bias=bool(f.take("attention_bias", False)),
        tie_word_embeddings=bool(f.take("tie_word_embeddings", False)),
        bos_token_id=f.take("bos_token_id", None),
        eos_token_ids=f.eos_token_ids(),
    )
    f.reject_unknown()
    return cfg
