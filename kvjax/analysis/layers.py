"""The weights of each decoder block, as a list of matrices plus a count of vector parameters.

Both parameter counting (:mod:`kvjax.analysis.sizing`) and FLOP counting
(:mod:`kvjax.analysis.roofline`) read this one description, so they cannot disagree.
The layout follows the Hugging Face implementations (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``DeepseekV2ForCausalLM``) and GPT-2/GPT-3 for the LayerNorm/GELU case.
"""

from __future__ import annotations

import dataclasses

from kvjax.analysis.spec import ArchSpec


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One linear projection ``out = x @ W (+ b)``, possibly stored once per expert."""

    name: str  # module name, e.g. "q_proj" or "experts.down_proj"
    in_features: int  # input width
    out_features: int  # output width
    bias: bool  # whether a bias vector of out_features is added
    copies: int = 1  # instances stored (routed experts: num_experts)
    active: int = 1  # instances each token goes through (routed experts: top-k)

    @property
    def params_per_copy(self) -> int:
        """Weights and bias of one instance."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def params(self) -> int:
        """Parameters stored, all instances."""
        return self.copies * self.params_per_copy

    @property
    def active_params(self) -> int:
        """Parameters one token is multiplied by."""
        return self.active * self.params_per_copy


def norm_params(spec: ArchSpec, width: int) -> int:
    """Parameters of one normalization layer: RMSNorm has a weight, LayerNorm also a bias."""
    return width if spec.norm == "rmsnorm" else 2 * width


def attention_matmuls(spec: ArchSpec) -> list[Matmul]:
    """Projections of one attention block."""
    h = spec.hidden_size
    if spec.mla is None:
        q_width = spec.num_heads * spec.head_dim
        kv_width = spec.num_kv_heads * spec.head_dim
        return [
            Matmul("q_proj", h, q_width, spec.qkv_bias),
            Matmul("k_proj", h, kv_width, spec.qkv_bias),
            Matmul("v_proj", h, kv_width, spec.qkv_bias),
            Matmul("o_proj", q_width, h, spec.o_bias),
        ]
    m = spec.mla
    heads = spec.num_heads
    out: list[Matmul] = []
    # As in DeepseekV2Attention: the plain q_proj and both *_b_proj never carry a bias;
    # attention_bias (our qkv_bias / o_bias) applies to q_a_proj, kv_a_proj_with_mqa, o_proj.
    if m.q_lora_rank is None:
        out.append(Matmul("q_proj", h, heads * m.qk_head_dim, False))
    else:
        out.append(Matmul("q_a_proj", h, m.q_lora_rank, spec.qkv_bias))
        out.append(Matmul("q_b_proj", m.q_lora_rank, heads * m.qk_head_dim, False))
    out.append(Matmul("kv_a_proj_with_mqa", h, m.cached_width, spec.qkv_bias))
    out.append(Matmul("kv_b_proj", m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim),
                      False))
    out.append(Matmul("o_proj", heads * m.v_head_dim, h, spec.o_bias))
    return out


def _dense_mlp(spec: ArchSpec, prefix: str, width: int) -> list[Matmul]:
    h = spec.hidden_size
    up = [Matmul(f"{prefix}up_proj", h, width, spec.mlp_bias)]
    if spec.mlp == "swiglu":
        up.insert(0, Matmul(f"{prefix}gate_proj", h, width, spec.mlp_bias))
    return [*up, Matmul(f"{prefix}down_proj", width, h, spec.mlp_bias)]


def mlp_matmuls(spec: ArchSpec, layer: int) -> list[Matmul]:
    """Projections of block ``layer``'s MLP (dense, or router + routed + shared experts)."""
    if not spec.is_moe_layer(layer):
        return _dense_mlp(spec, "", spec.intermediate_size)
    moe = spec.moe
    assert moe is not None
    h, width, e, k = spec.hidden_size, moe.moe_intermediate_size, moe.num_experts, moe.experts_per_token
    # Routed experts carry no bias (DeepseekV2Experts stores bare gate_up/down tensors);
    # the router ("gate") is a bias-free hidden -> num_experts matrix.
    out = [
        Matmul("gate", h, e, False),
        Matmul("experts.gate_proj", h, width, False, copies=e, active=k),
        Matmul("experts.up_proj", h, width, False, copies=e, active=k),
        Matmul("experts.down_proj", width, h, False, copies=e, active=k),
    ]
    if moe.num_shared_experts:
        out += _dense_mlp(spec, "shared_experts.", width * moe.num_shared_experts)
    return out


def layer_matmuls(spec: ArchSpec, layer: int) -> list[Matmul]:
    """All projections of decoder block ``layer`` (0-based)."""
    if not 0 <= layer < spec.num_layers:
        raise IndexError(f"layer {layer} out of range for {spec.num_layers} layers")
    return attention_matmuls(spec) + mlp_matmuls(spec, layer)


def layer_vector_params(spec: ArchSpec) -> int:
    """Non-matrix parameters of one block: its two norms, plus MLA's latent norms."""
    total = 2 * norm_params(spec, spec.hidden_size)
    if spec.mla is not None:
        if spec.mla.latent_norm:
            total += norm_params(spec, spec.mla.kv_lora_rank)
        if spec.mla.q_lora_rank is not None:
            total += norm_params(spec, spec.mla.q_lora_rank)
    return total


def embedding_params(spec: ArchSpec) -> int:
    """Token embedding table plus any learned position table."""
    return (spec.vocab_size + spec.learned_pos_embeddings) * spec.hidden_size


def head_matmul(spec: ArchSpec) -> Matmul:
    """The LM head (hidden -> vocab, no bias); stored separately only when untied."""
    return Matmul("lm_head", spec.hidden_size, spec.vocab_size, False)


def final_norm_params(spec: ArchSpec) -> int:
    """The norm after the last block."""
    return norm_params(spec, spec.hidden_size)
