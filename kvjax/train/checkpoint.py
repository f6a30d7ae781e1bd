"""Save a trained model as a Hugging Face checkpoint directory.

``config.json`` + ``model.safetensors`` (float32, tensor names and [out, in] weight layout
of ``transformers``) + the word-level tokenizer (``tokenizer.json``,
``tokenizer_config.json``). A Llama-family model is read back by
:func:`kvjax.models.load_checkpoint`, an MLA model by
:func:`kvjax.models.load_mla_checkpoint` (as ``deepseek_v3`` with dense MLP layers only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from kvjax.config import Llama3RopeScaling, ModelConfig
from kvjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab
from kvjax.mla_config import MLAConfig
from kvjax.models.checkpoint import hf_tensor_name
from kvjax.train.loop import Params


def _rope(theta: float, scaling: Llama3RopeScaling | None) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": theta}
    if scaling is not None:
        rope["rope_scaling"] = {"rope_type": "llama3", "factor": scaling.factor,
                                "low_freq_factor": scaling.low_freq_factor,
                                "high_freq_factor": scaling.high_freq_factor,
                                "original_max_position_embeddings":
                                    scaling.original_max_position_embeddings}
    return rope


def hf_config(cfg: ModelConfig | MLAConfig) -> dict[str, Any]:
    """The ``config.json`` contents that parse back to ``cfg`` (ValueError for what the
    Hugging Face formats cannot say: a Llama o bias without q/k/v bias, several RoPE key
    heads or no latent norm in MLA, a Qwen2 model)."""
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "rms_norm_eps": cfg.rms_norm_eps,
              "max_position_embeddings": cfg.max_position_embeddings,
              "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
              "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
              **_rope(cfg.rope_theta, cfg.rope_scaling)}
    if isinstance(cfg, MLAConfig):
        if cfg.rope_key_heads != 1 or not cfg.latent_norm:
            raise ValueError("a deepseek_v3 config holds one RoPE key head and a latent norm; "
                             f"got rope_key_heads={cfg.rope_key_heads}, "
                             f"latent_norm={cfg.latent_norm}")
        return {"model_type": "deepseek_v3", **common, "num_key_value_heads": cfg.num_heads,
                "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
                "qk_nope_head_dim": cfg.qk_nope_head_dim,
                "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
                "rope_interleave": cfg.rope_interleave, "attention_bias": cfg.attention_bias,
                "first_k_dense_replace": cfg.num_layers}
    if cfg.family != "llama" or cfg.qkv_bias != cfg.o_bias:
        raise ValueError("only Llama configs with all four attention biases or none are saved")
    return {"model_type": "llama", **common, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "attention_bias": cfg.qkv_bias}


def hf_tensors(params: Params) -> dict[str, np.ndarray]:
    """Parameter tree -> Hugging Face tensors (float32; Dense kernels transposed)."""
    tensors = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in key_path)
        array = np.asarray(leaf, np.float32)
        tensors[hf_tensor_name(path)] = np.ascontiguousarray(
            array.T if path[-1] == "kernel" else array)
    return tensors


def save_checkpoint(path: str | Path, cfg: ModelConfig | MLAConfig, params: Params,
                    vocab: Vocab) -> Path:
    """Write the checkpoint directory ``path``; the config's special ids are set to the
    vocabulary's (``<s>`` / ``</s>``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))
    raw = {**hf_config(cfg), "pad_token_id": PAD_ID}
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file(hf_tensors(params), str(path / "model.safetensors"))
    vocab.save_tokenizer(path)
    return path
