"""Architecture description for sizing: :class:`ArchSpec`.

:class:`kvjax.config.ModelConfig` describes exactly the models kvjax can *run*. Sizing
needs to describe more (GPT-3 style learned positions, LayerNorm and GELU MLPs,
DeepSeek-V2's multi-head latent attention and mixture of experts), but none of the
numerics, so it has its own smaller description. ``ArchSpec`` holds only what changes
parameter counts, KV-cache size or FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kvjax.config import ConfigError, Family, ModelConfig
from kvjax.mla_config import MLAConfig

MlpKind = Literal["swiglu", "gelu"]
NormKind = Literal["rmsnorm", "layernorm"]
AttentionKind = Literal["mha-family", "mla"]

_MLP_KINDS = ("swiglu", "gelu")
_NORM_KINDS = ("rmsnorm", "layernorm")


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2) dimensions.

    The cache holds, per token and layer, one compressed latent of ``kv_lora_rank``
    values plus the decoupled RoPE key: DeepSeek has one head of ``qk_rope_head_dim``
    values shared by all query heads; a model converted from GQA keeps ``rope_key_heads``.
    """

    kv_lora_rank: int  # width of the compressed KV latent c_KV (cached)
    qk_rope_head_dim: int  # per-head width of the RoPE part of q/k; the k part is shared and cached
    qk_nope_head_dim: int  # per-head width of the non-RoPE part of q/k (decompressed from c_KV)
    v_head_dim: int  # per-head width of values (decompressed from c_KV)
    q_lora_rank: int | None  # width of the compressed query latent; None = plain q_proj
    rope_key_heads: int = 1  # cached RoPE key heads (DeepSeek: 1)
    latent_norm: bool = True  # RMSNorm on c_KV (DeepSeek's kv_a_layernorm)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "rope_key_heads"):
            _check_positive(name, getattr(self, name))
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            raise ConfigError("qk_nope_head_dim must be a non-negative integer, "
                              f"got {self.qk_nope_head_dim!r}")
        if self.q_lora_rank is not None:
            _check_positive("q_lora_rank", self.q_lora_rank)

    @property
    def cached_width(self) -> int:
        """Values cached per token and layer: c_KV plus the RoPE key heads."""
        return self.kv_lora_rank + self.rope_key_heads * self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (non-RoPE + RoPE parts)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts MLP (DeepSeek-V2 style: routed experts + always-on shared experts)."""

    num_experts: int  # routed experts stored in each MoE layer
    experts_per_token: int  # routed experts each token is sent to (top-k)
    num_shared_experts: int  # experts every token goes through; stored fused as one MLP
    moe_intermediate_size: int  # hidden width of one expert (routed or shared)
    first_k_dense_replace: int = 0  # leading layers that keep a dense MLP of intermediate_size

    def __post_init__(self) -> None:
        _check_positive("num_experts", self.num_experts)
        _check_positive("experts_per_token", self.experts_per_token)
        _check_positive("moe_intermediate_size", self.moe_intermediate_size)
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} exceeds "
                              f"num_experts={self.num_experts}")
        for name in ("num_shared_experts", "first_k_dense_replace"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What a decoder-only transformer's size and cost depend on.

    For MLA models ``num_kv_heads`` equals ``num_heads`` and ``head_dim`` is the q/k head
    width (nope + rope); both are informational, the MLA fields decide sizes.
    """

    name: str  # human-readable model name
    num_layers: int  # decoder blocks
    hidden_size: int  # residual stream width (d_model)
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (1 = MQA, num_heads = MHA)
    head_dim: int  # width of one attention head
    intermediate_size: int  # hidden width of a dense MLP
    vocab_size: int  # rows of the token embedding table
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix (counted once)
    mlp: MlpKind = "swiglu"  # "swiglu" (gate, up, down) or "gelu" (up, down; GPT-style)
    qkv_bias: bool = False  # bias on the q/k/v projections (MLA: on q_a_proj and kv_a_proj)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on the dense/shared MLP projections
    norm: NormKind = "rmsnorm"  # "rmsnorm" (weight only) or "layernorm" (weight + bias)
    learned_pos_embeddings: int = 0  # rows of a learned position table (GPT-3: 2048); 0 = RoPE
    max_context_len: int = 2048  # longest context the model accepts (default sizing length)
    sliding_window: int | None = None  # attention window; caps the cache per sequence (None = full)
    mla: MLASpec | None = None  # multi-head latent attention dims; None = MHA/GQA/MQA
    moe: MoESpec | None = None  # mixture-of-experts MLP; None = every layer dense

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_context_len"):
            _check_positive(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads} must divide "
                              f"num_heads={self.num_heads}")
        if self.mlp not in _MLP_KINDS:
            raise ConfigError(f"mlp={self.mlp!r} is not one of {_MLP_KINDS}")
        if self.norm not in _NORM_KINDS:
            raise ConfigError(f"norm={self.norm!r} is not one of {_NORM_KINDS}")
        if not isinstance(self.learned_pos_embeddings, int) or self.learned_pos_embeddings < 0:
            raise ConfigError("learned_pos_embeddings must be a non-negative integer, "
                              f"got {self.learned_pos_embeddings!r}")
        if self.sliding_window is not None:
            _check_positive("sliding_window", self.sliding_window)
        if self.moe is not None and self.moe.first_k_dense_replace > self.num_layers:
            raise ConfigError(f"first_k_dense_replace={self.moe.first_k_dense_replace} exceeds "
                              f"num_layers={self.num_layers}")

    @property
    def attention(self) -> AttentionKind:
        """``"mla"`` for multi-head latent attention, else ``"mha-family"`` (MHA/GQA/MQA)."""
        return "mla" if self.mla is not None else "mha-family"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder block ``layer`` (0-based) has a mixture-of-experts MLP."""
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, name: str | None = None) -> ArchSpec:
        """The sizing view of a runnable Llama/Qwen2 :class:`ModelConfig`."""
        return cls(
            name=name or cfg.family,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings,
            qkv_bias=cfg.qkv_bias,
            o_bias=cfg.o_bias,
            max_context_len=cfg.max_position_embeddings,
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig | MLAConfig, name: str | None = None) -> ArchSpec:
        """The sizing view of either runnable config."""
        if isinstance(cfg, MLAConfig):
            return cls.from_mla_config(cfg, name=name or "mla")
        return cls.from_model_config(cfg, name=name)

    @classmethod
    def from_mla_config(cls, cfg: MLAConfig, name: str = "mla") -> ArchSpec:
        """The sizing view of a runnable :class:`MLAConfig` (DeepSeek or converted)."""
        return cls(
            name=name, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.qk_head_dim,
            intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings, qkv_bias=cfg.attention_bias,
            o_bias=cfg.attention_bias, max_context_len=cfg.max_position_embeddings,
            mla=MLASpec(kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
                        q_lora_rank=cfg.q_lora_rank, rope_key_heads=cfg.rope_key_heads,
                        latent_norm=cfg.latent_norm))

    def to_model_config(self, num_layers: int | None = None) -> ModelConfig:
        """The runnable Llama/Qwen2 config of this architecture (random-weight runs).

        ``num_layers`` overrides the depth (a shallower model for small machines).
        Raises ConfigError for what ``kvjax.models`` cannot run (GELU MLP, LayerNorm,
        learned positions, MLA, MoE, MLP bias, sliding windows).
        """
        unsupported = {"mlp": self.mlp != "swiglu", "norm": self.norm != "rmsnorm",
                       "learned_pos_embeddings": self.learned_pos_embeddings > 0,
                       "mla": self.mla is not None, "moe": self.moe is not None,
                       "mlp_bias": self.mlp_bias, "sliding_window": self.sliding_window is not None}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"{self.name}: {bad} not supported by kvjax.models")
        if self.o_bias and not self.qkv_bias:
            raise ConfigError(f"{self.name}: an o bias without q/k/v bias is not supported")
        # Qwen2 = q/k/v bias without an o bias; Llama = all four biases or none.
        family: Family = "qwen2" if self.qkv_bias and not self.o_bias else "llama"
        return ModelConfig(
            family=family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=num_layers or self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_context_len,
            qkv_bias=self.qkv_bias, o_bias=self.o_bias,
            tie_word_embeddings=self.tie_word_embeddings)

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any], name: str | None = None) -> ArchSpec:
        """Parse a Hugging Face ``config.json`` dict.

        ``llama`` and ``qwen2`` go through :meth:`ModelConfig.from_hf_dict` (so unknown keys
        are rejected the same way); ``mistral`` is read as Llama plus a sliding window;
        ``deepseek_v2`` (MLA + MoE) is read here.
        """
        model_type = raw.get("model_type")
        label = name or str(raw.get("_name_or_path") or model_type)
        if model_type in ("llama", "qwen2"):
            return cls.from_model_config(ModelConfig.from_hf_dict(raw), name=label)
        if model_type == "mistral":
            window = raw.get("sliding_window")
            as_llama = {k: v for k, v in raw.items() if k != "sliding_window"}
            as_llama["model_type"] = "llama"
            spec = cls.from_model_config(ModelConfig.from_hf_dict(as_llama), name=label)
            return dataclasses.replace(spec, sliding_window=int(window) if window else None)
        if model_type == "deepseek_v2":
            return _from_deepseek_v2(raw, label)
        raise ConfigError(f"model_type={model_type!r} is not supported for sizing "
                          "(supported: llama, qwen2, mistral, deepseek_v2)")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _from_deepseek_v2(raw: dict[str, Any], name: str) -> ArchSpec:
    """DeepSeek-V2 ``config.json`` (HF ``DeepseekV2Config`` or the original remote code)."""

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ConfigError(f"config.json is missing required field {key!r}")
        return raw[key]

    if raw.get("moe_layer_freq", 1) != 1:
        raise ConfigError("moe_layer_freq != 1 is not supported")
    if raw.get("use_mla", True) is not True:
        raise ConfigError("use_mla=false is not supported")
    heads = int(need("num_attention_heads"))
    q_lora = raw.get("q_lora_rank")
    mla = MLASpec(
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        q_lora_rank=int(q_lora) if q_lora is not None else None,
    )
    moe = None
    if raw.get("n_routed_experts") is not None:
        if raw.get("num_experts_per_tok") is None:
            raise ConfigError("n_routed_experts is set but num_experts_per_tok is not")
        moe = MoESpec(
            num_experts=int(raw["n_routed_experts"]),
            experts_per_token=int(raw["num_experts_per_tok"]),
            num_shared_experts=int(raw.get("n_shared_experts") or 0),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
        )
    attention_bias = bool(raw.get("attention_bias", False))
    return ArchSpec(
        name=name,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=int(need("hidden_size")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=mla.qk_head_dim,
        intermediate_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        max_context_len=int(raw.get("max_position_embeddings") or 2048),
        mla=mla,
        moe=moe,
    )
