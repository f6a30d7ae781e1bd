"""Tiny Hugging Face checkpoints built locally with ``transformers`` (no download).

They give tests and the built-in demo real checkpoints — ``config.json``,
safetensors and a ``tokenizer.json`` — in the exact format a downloaded model has,
so the real loading path is the one exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

# A small English word list for the demo tokenizer (word-level, whitespace split).
_WORDS = (
    "the a an and or but if then so of to in on at by for with from as is are was were be "
    "been have has had do did will would can could should may might must I you he she it we "
    "they me him her us them my your his its our their this that these those what which who "
    "when where why how all some any no not yes one two three four five six seven eight nine "
    "ten yesterday today tomorrow work worked working will-work cache key value token page "
    "block memory model attention head layer sequence prefix tree host device disk fast slow "
    "big small new old first last next time day year people way thing man woman child world "
    "life hand part place case week system program question number night point home water "
    "room mother area money story fact month lot right study book eye job word business issue "
    "side kind house service friend father power hour game line end member law car city name "
    ". , ? !"
).split()

Family = Literal["llama", "qwen2"]
MLAFamily = Literal["deepseek_v2", "deepseek_v3"]


def _tokenizer_files(vocab_words: list[str], vocab_size: int) -> dict[str, Any]:
    """A word-level tokenizer with special tokens, as tokenizer.json contents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    words = [w for w in vocab_words if w not in specials]
    vocab = {tok: i for i, tok in enumerate([*specials, *words][:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return json.loads(tok.to_str())


def build_tiny_checkpoint(path: str | Path, *, family: Family = "llama", seed: int = 0,
                          hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, intermediate_size: int = 128,
                          vocab_size: int | None = None, max_position_embeddings: int = 512,
                          llama3_rope_scaling: bool = False, attention_bias: bool = False,
                          tie_word_embeddings: bool | None = None,
                          with_tokenizer: bool = True, max_shard_size: str | None = None,
                          weight_std: float = 0.25) -> Path:
    """Save a randomly initialised Llama or Qwen2 checkpoint (and tokenizer) under ``path``.

    ``vocab_size`` defaults to the demo tokenizer's size. ``max_shard_size`` (e.g.
    ``"20KB"``) forces a sharded ``model.safetensors.index.json`` layout.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_json = _tokenizer_files(list(_WORDS), 10**6)
    n_vocab = vocab_size or len(tok_json["model"]["vocab"])
    common: dict[str, Any] = dict(
        vocab_size=n_vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )
    model: Any
    if family == "llama":
        rope = _rope_parameters(llama3_rope_scaling, max_position_embeddings)
        extra: dict[str, Any] = dict(rope_parameters=rope, attention_bias=attention_bias,
                                     tie_word_embeddings=bool(tie_word_embeddings))
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    elif family == "qwen2":
        tied = True if tie_word_embeddings is None else tie_word_embeddings
        extra = dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     tie_word_embeddings=tied)
        model = Qwen2ForCausalLM(Qwen2Config(**common, **extra))
    else:
        raise ValueError(f"family must be llama or qwen2, got {family!r}")
    _randomise(model, seed, weight_std)
    _save(model, path, tok_json if with_tokenizer else None, max_shard_size)
    return path


def build_tiny_mla_checkpoint(path: str | Path, *, family: MLAFamily = "deepseek_v2",
                              seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                              num_heads: int = 4, kv_lora_rank: int = 16,
                              q_lora_rank: int | None = None, qk_nope_head_dim: int = 16,
                              qk_rope_head_dim: int = 8, v_head_dim: int = 12,
                              intermediate_size: int = 128, vocab_size: int | None = None,
                              max_position_embeddings: int = 512, rope_interleave: bool = True,
                              llama3_rope_scaling: bool = False, attention_bias: bool = False,
                              tie_word_embeddings: bool = False, with_tokenizer: bool = True,
                              weight_std: float = 0.25) -> Path:
    """Save a randomly initialised DeepSeek-V2 or -V3 checkpoint with dense MLP layers only
    (``first_k_dense_replace = num_layers``). ``rope_interleave`` exists for V3 only (V2
    always interleaves); ``llama3_rope_scaling`` as in :func:`build_tiny_checkpoint`."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_json = _tokenizer_files(list(_WORDS), 10**6)
    extra: dict[str, Any] = {}
    if family == "deepseek_v3":
        extra["rope_interleave"] = rope_interleave
    elif not rope_interleave:
        raise ValueError("DeepSeek-V2 always interleaves RoPE; rope_interleave=False needs V3")
    classes: dict[str, tuple[Any, Any]] = {
        "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be deepseek_v2 or deepseek_v3, got {family!r}")
    config_cls, model_cls = classes[family]
    config = config_cls(
        vocab_size=vocab_size or len(tok_json["model"]["vocab"]), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
        first_k_dense_replace=num_layers, max_position_embeddings=max_position_embeddings,
        rope_parameters=_rope_parameters(llama3_rope_scaling, max_position_embeddings),
        attention_bias=attention_bias, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, **extra)
    model = model_cls(config)
    _randomise(model, seed, weight_std)
    _save(model, path, tok_json if with_tokenizer else None, None)
    return path


def _rope_parameters(llama3_scaling: bool, max_position_embeddings: int) -> dict[str, Any]:
    """Plain RoPE with base 10000, or Llama-3 scaling of a context a quarter as long."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_scaling:
        rope.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=max_position_embeddings // 4)
    return rope


def _randomise(model: Any, seed: int, weight_std: float) -> None:
    """Weights larger than transformers' default init, so greedy decoding wanders through
    the vocabulary instead of settling on one token and logits are far from ties; norm
    weights near 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(weight_std * noise)


def _save(model: Any, path: Path, tok_json: dict[str, Any] | None,
          max_shard_size: str | None) -> None:
    """``save_pretrained`` the model and, given its contents, the word-level tokenizer."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.eval().save_pretrained(path, **kwargs)
    if tok_json is not None:
        from tokenizers import Tokenizer

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(tok_json)),
            unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        tokenizer.save_pretrained(path)
