"""Tests for kvjax.analysis: KV/weight sizing, parameter counts, roofline, and the size CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.analysis import layers
from kvjax.analysis.presets import PRESETS, UnknownPresetError, get_preset, preset_names
from kvjax.analysis.roofline import (
    DEVICES,
    decode_cost,
    expected_experts_touched,
    get_device,
    layer_decode_cost,
    layer_prefill_cost,
    prefill_cost,
    roofline,
)
from kvjax.analysis.size_cli import register
from kvjax.analysis.sizing import (
    active_param_count,
    crossover_tokens,
    dtype_bytes,
    kv_bytes,
    kv_bytes_per_token,
    kv_elements_per_token_per_layer,
    param_count,
    size_report,
    storage_dtype,
    weight_bytes,
)
from kvjax.analysis.spec import ArchSpec, MLASpec, MoESpec
from kvjax.config import ConfigError

# ----------------------------------------------------------------------------- dtypes


def test_dtype_table() -> None:
    assert [dtype_bytes(d) for d in ("fp32", "bf16", "fp16", "fp8", "int8", "int4")] == [
        4, 2, 2, 1, 1, 0.5]
    assert dtype_bytes("BF16") == 2
    with pytest.raises(ValueError, match="'fp6'"):
        dtype_bytes("fp6")


# ----------------------------------------------------------------------------- published KV figures


def test_llama2_7b_kv_is_512_kib_per_token_fp16() -> None:
    assert kv_bytes_per_token(get_preset("Llama-2-7B"), "fp16") == 524288 == 512 * 1024


def test_gpt3_kv_per_token_fp16() -> None:
    assert kv_bytes_per_token(get_preset("GPT-3-175B"), "fp16") == 4_718_592


def test_deepseek_v2_caches_576_elements_per_token_per_layer() -> None:
    spec = get_preset("DeepSeek-V2")
    assert kv_elements_per_token_per_layer(spec) == 576 == 512 + 64
    assert kv_bytes_per_token(spec, "bf16") == 60 * 576 * 2


def test_llama3_8b_kv_is_128_kib_per_token_bf16() -> None:
    assert kv_bytes_per_token(get_preset("llama-3-8b"), "bf16") == 131072 == 128 * 1024


def test_kv_bytes_scales_and_packs_int4() -> None:
    spec = get_preset("Llama-3-8B")
    assert kv_bytes(spec, "bf16", 4, 1000) == 4 * 1000 * 131072
    assert kv_bytes(spec, "int4", 1, 1) == 131072 // 4
    assert kv_bytes(spec, "fp8", 3, 0) == 0
    # Mistral-7B's sliding window makes the cache a rolling buffer of 4096 tokens.
    mistral = get_preset("Mistral-7B")
    assert kv_bytes(mistral, "bf16", 1, 32768) == kv_bytes(mistral, "bf16", 1, 4096)


# ----------------------------------------------------------------------------- published parameter counts

# (preset, card figure in billions, decimals the card rounds to)
_CARD_TOTALS = [
    ("Llama-3-8B", 8.03, 2),
    ("Llama-2-7B", 6.74, 2),
    ("Qwen2.5-0.5B", 0.49, 2),
    ("Llama-3.2-1B", 1.24, 2),
    ("Mistral-7B", 7.24, 2),
    ("Llama-3.1-70B", 70.6, 1),
    ("DeepSeek-V2", 236, 0),
]


@pytest.mark.parametrize(("name", "billions", "digits"), _CARD_TOTALS)
def test_param_count_matches_model_cards(name: str, billions: float, digits: int) -> None:
    assert round(param_count(get_preset(name)) / 1e9, digits) == billions


def test_param_count_exact_for_known_checkpoints() -> None:
    # Totals of the released safetensors checkpoints.
    assert param_count(get_preset("Llama-3-8B")) == 8_030_261_248
    assert param_count(get_preset("Llama-2-7B")) == 6_738_415_616
    assert param_count(get_preset("Qwen2.5-0.5B")) == 494_032_768
    assert param_count(get_preset("Llama-3.2-1B")) == 1_235_814_400
    assert param_count(get_preset("Mistral-7B")) == 7_241_732_096


def test_gpt3_175b_within_one_percent() -> None:
    n = param_count(get_preset("GPT-3-175B"))
    assert abs(n - 175e9) / 175e9 < 0.01
    # GPT-2 block, by hand: 12 d^2 + 13 d per layer, token + position tables, final LN.
    d, layers_, vocab, ctx = 12288, 96, 50257, 2048
    assert n == layers_ * (12 * d * d + 13 * d) + (vocab + ctx) * d + 2 * d


def test_deepseek_v2_active_params_about_21b() -> None:
    spec = get_preset("DeepSeek-V2")
    assert round(active_param_count(spec) / 1e9) == 21
    dense = get_preset("Llama-3-8B")
    assert active_param_count(dense) == param_count(dense)


# ----------------------------------------------------------------------------- against transformers

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _hf_count(config: Any, model_cls: Any) -> tuple[int, int]:
    torch.manual_seed(0)
    model = model_cls(config)
    spec = ArchSpec.from_hf_config(config.to_dict())
    return param_count(spec), model.num_parameters()


@pytest.mark.parametrize("kwargs", [
    {},
    {"tie_word_embeddings": True},
    {"attention_bias": True},
    {"attention_bias": True, "tie_word_embeddings": True, "num_key_value_heads": 1},
    {"head_dim": 24, "num_key_value_heads": 4},
], ids=["untied", "tied", "bias", "bias-tied-mqa", "head_dim"])
def test_param_count_matches_hf_llama(kwargs: dict[str, Any]) -> None:
    cfg = transformers.LlamaConfig(**{**_TINY, **kwargs})
    ours, theirs = _hf_count(cfg, transformers.LlamaForCausalLM)
    assert ours == theirs


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_hf_qwen2(tied: bool) -> None:
    cfg = transformers.Qwen2Config(**_TINY, tie_word_embeddings=tied)
    ours, theirs = _hf_count(cfg, transformers.Qwen2ForCausalLM)
    assert ours == theirs


def test_param_count_matches_hf_mistral_and_reads_window() -> None:
    cfg = transformers.MistralConfig(**_TINY, sliding_window=32)
    ours, theirs = _hf_count(cfg, transformers.MistralForCausalLM)
    assert ours == theirs
    assert ArchSpec.from_hf_config(cfg.to_dict()).sliding_window == 32


_DSV2 = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
             max_position_embeddings=128)


@pytest.mark.parametrize("kwargs", [
    {"q_lora_rank": 24},
    {"q_lora_rank": None, "attention_bias": True, "first_k_dense_replace": 0},
    {"q_lora_rank": 24, "attention_bias": True, "n_shared_experts": 1,
     "tie_word_embeddings": True},
], ids=["q-lora", "no-q-lora-bias", "bias-tied"])
def test_param_count_matches_hf_deepseek_v2(kwargs: dict[str, Any]) -> None:
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip("this transformers version has no DeepseekV2ForCausalLM")
    cfg = transformers.DeepseekV2Config(**{**_DSV2, **kwargs})
    ours, theirs = _hf_count(cfg, transformers.DeepseekV2ForCausalLM)
    assert ours == theirs
    spec = ArchSpec.from_hf_config(cfg.to_dict())
    assert spec.attention == "mla"
    assert kv_elements_per_token_per_layer(spec) == 16 + 8


def test_from_hf_config_reads_saved_v5_config(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(**_TINY, rope_theta=500000.0)
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    spec = ArchSpec.from_hf_config(raw)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 2, 16)


def test_from_hf_config_rejects_unknown_model_type() -> None:
    with pytest.raises(ConfigError, match="gpt_neox"):
        ArchSpec.from_hf_config({"model_type": "gpt_neox"})


def test_from_model_config_matches_from_hf_config() -> None:
    from kvjax.config import ModelConfig

    raw = transformers.Qwen2Config(**_TINY).to_dict()
    assert ArchSpec.from_model_config(ModelConfig.from_hf_dict(raw), name="x") == \
        ArchSpec.from_hf_config(raw, name="x")


# ----------------------------------------------------------------------------- presets and spec


def test_get_preset_is_case_insensitive_and_lists_names_on_error() -> None:
    assert get_preset("DEEPSEEK-v2") is PRESETS["DeepSeek-V2"]
    with pytest.raises(UnknownPresetError) as err:
        get_preset("llama-9")
    assert "llama-9" in str(err.value)
    for name in preset_names():
        assert name in str(err.value)


def test_spec_validation() -> None:
    base = get_preset("Llama-3-8B")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        dataclasses.replace(base, num_kv_heads=5)
    with pytest.raises(ConfigError, match="mlp"):
        dataclasses.replace(base, mlp="relu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="experts_per_token"):
        MoESpec(num_experts=4, experts_per_token=5, num_shared_experts=0,
                moe_intermediate_size=8)
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        MLASpec(kv_lora_rank=0, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                q_lora_rank=None)


# ----------------------------------------------------------------------------- weights and crossover


def test_weight_bytes() -> None:
    spec = get_preset("Llama-3-8B")
    assert weight_bytes(spec, "bf16") == 2 * 8_030_261_248
    assert weight_bytes(spec, "int4") == 8_030_261_248 // 2


@pytest.mark.parametrize(("kv_dtype", "weight_dtype", "batch"), [
    ("bf16", "bf16", 1), ("bf16", "bf16", 8), ("fp8", "bf16", 3), ("int4", "int8", 64),
])
def test_crossover_tokens(kv_dtype: str, weight_dtype: str, batch: int) -> None:
    spec = get_preset("Llama-3-8B")
    # Independently: bytes per token = 32 layers * 2 (K,V) * 8 heads * 128 dims * bytes.
    per_token = 32 * 2 * 8 * 128 * {"bf16": 2, "fp8": 1, "int4": 0.5}[kv_dtype]
    weights = 8_030_261_248 * {"bf16": 2, "int8": 1}[weight_dtype]
    t = crossover_tokens(spec, kv_dtype, weight_dtype, batch)
    assert t is not None
    assert batch * t * per_token > weights >= batch * (t - 1) * per_token
    assert kv_bytes(spec, kv_dtype, batch, t) > weight_bytes(spec, weight_dtype)
    assert kv_bytes(spec, kv_dtype, batch, t - 1) <= weight_bytes(spec, weight_dtype)


def test_crossover_llama3_8b_value_and_sliding_window() -> None:
    # 16,060,522,496 weight bytes / 131,072 bytes per token = 122,532.6 -> 122,533.
    assert crossover_tokens(get_preset("Llama-3-8B"), "bf16", "bf16", 1) == 122_533
    mistral = get_preset("Mistral-7B")
    assert crossover_tokens(mistral, "bf16", "bf16", 1) is None  # window of 4096 caps it
    t = crossover_tokens(mistral, "bf16", "bf16", 64)
    assert t is not None and t <= 4096


def test_size_report_bundles_everything() -> None:
    spec = get_preset("Llama-3-8B")
    rep = size_report(spec, dtype="fp8", weight_dtype="bf16", batch=4, seq_len=8192)
    assert rep.kv_bytes_per_token == 65536
    assert rep.kv_bytes_total == 4 * 8192 * 65536
    assert rep.weight_bytes == 2 * 8_030_261_248
    assert rep.total_bytes == rep.weight_bytes + rep.kv_bytes_total
    assert rep.crossover_tokens == crossover_tokens(spec, "fp8", "bf16", 4)
    d = rep.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert size_report(spec).seq_len == 8192  # defaults to the model's context
    with pytest.raises(ValueError, match="'fp6'"):
        size_report(spec, dtype="fp6")


# ----------------------------------------------------------------------------- roofline


def test_device_presets_and_overrides() -> None:
    assert (DEVICES["h100"].peak_flops, DEVICES["h100"].mem_bandwidth) == (989e12, 3.35e12)
    assert (DEVICES["h200"].peak_flops, DEVICES["h200"].mem_bandwidth) == (989e12, 4.8e12)
    measured = get_device("H100", peak_tflops=700, bandwidth_tbps=3.0)
    assert (measured.peak_flops, measured.mem_bandwidth) == (700e12, 3.0e12)
    with pytest.raises(ValueError, match="tpu"):
        get_device("tpu")


def test_llama3_8b_prefill_compute_bound_decode_memory_bound_on_h100() -> None:
    spec, h100 = get_preset("Llama-3-8B"), get_device("h100")
    pre = roofline(prefill_cost(spec, 2048, batch=1), h100)
    dec = roofline(decode_cost(spec, 2048, batch=1), h100)
    assert pre.bound == "compute"
    assert pre.intensity > h100.ridge_point
    assert dec.bound == "memory"
    assert dec.intensity < 2  # about one FLOP per byte at batch 1
    # A decode step can be no faster than streaming the weights once (all but the
    # embedding rows it does not look up).
    streamed = weight_bytes(spec, "bf16") - 2 * 128256 * 4096
    assert dec.time_s >= streamed / h100.mem_bandwidth
    assert dec.cost.weight_bytes == streamed + 2 * 4096  # plus the one row looked up
    # Per layer, too.
    assert roofline(layer_prefill_cost(spec, 0, 2048), h100).bound == "compute"
    assert roofline(layer_decode_cost(spec, 0, 2048), h100).bound == "memory"


def test_llama3_8b_flop_counts() -> None:
    spec = get_preset("Llama-3-8B")
    L, H, d, h, V = 32, 32, 128, 4096, 128256
    matmul_params = param_count(spec) - V * h - (2 * L + 1) * h  # drop embedding and norms
    B, T = 4, 3000
    dec = decode_cost(spec, T, batch=B)
    assert dec.matmul_flops == 2 * B * matmul_params
    assert dec.attention_flops == L * B * T * 4 * H * d
    assert dec.kv_read_bytes == B * T * kv_bytes_per_token(spec, "bf16")
    P = 2048
    pre = prefill_cost(spec, P, batch=1)
    # Every token goes through every layer; the LM head only for the last position.
    assert pre.matmul_flops == 2 * P * (matmul_params - V * h) + 2 * V * h
    assert pre.attention_flops == L * (P * (P + 1) // 2) * 4 * H * d  # causal: ~half of P^2
    assert pre.kv_write_bytes == P * kv_bytes_per_token(spec, "bf16")


def test_moe_weight_traffic_grows_with_batch() -> None:
    spec = get_preset("DeepSeek-V2")
    assert expected_experts_touched(160, 6, 1) == pytest.approx(6)
    assert expected_experts_touched(160, 6, 100_000) == pytest.approx(160)
    one = decode_cost(spec, 4096, batch=1)
    many = decode_cost(spec, 4096, batch=256)
    assert one.weight_bytes < many.weight_bytes <= weight_bytes(spec, "bf16") + 1e6
    # At batch 1 decode reads about the active parameters, not all 236B.
    assert one.weight_bytes < 0.15 * weight_bytes(spec, "bf16")


def test_mla_decode_reads_latent_cache() -> None:
    spec = get_preset("DeepSeek-V2")
    dec = layer_decode_cost(spec, 5, 1000, batch=2)
    assert dec.kv_read_bytes == 2 * 1000 * 576 * 2
    # Absorbed attention: per key 2H(512+64) for scores plus 2H*512 for values.
    assert dec.attention_flops == 2 * 1000 * (2 * 128 * 576 + 2 * 128 * 512)


def test_layers_cover_param_count() -> None:
    spec = get_preset("DeepSeek-V2")
    names = [m.name for m in layers.layer_matmuls(spec, 1)]
    assert names[:5] == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    assert "gate_proj" in [m.name for m in layers.layer_matmuls(spec, 0)]  # dense first layer


# ----------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvjax")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run_cli(["size", "--preset", "llama-3-8b", "--batch", "2", "--seq-len", "4096",
                   "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    data = json.loads(out)
    assert data["name"] == "Llama-3-8B"
    assert data["kv_bytes_per_token"] == 131072
    assert data["kv_bytes_total"] == 2 * 4096 * 131072
    assert data["param_count"] == 8_030_261_248
    assert data["weight_bytes"] == 2 * 8_030_261_248
    assert data["crossover_tokens"] == crossover_tokens(get_preset("Llama-3-8B"), "bf16", "bf16", 2)
    assert data["roofline"]["prefill"]["bound"] == "compute"
    assert data["roofline"]["decode"]["bound"] == "memory"
    assert data["roofline"]["decode"]["mem_bandwidth"] == 3.35e12


def test_cli_dtypes_and_device(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run_cli(["size", "--preset", "Llama-2-7B", "--dtype", "fp16", "--weight-dtype",
                   "int4", "--device", "h200", "--bandwidth-tbps", "4.0", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["kv_bytes_per_token"] == 524288
    assert data["weight_bytes"] == 6_738_415_616 // 2
    assert data["seq_len"] == 4096
    assert data["roofline"]["decode"]["mem_bandwidth"] == 4.0e12


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["size", "--preset", "deepseek-v2", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V2" in out and "mla" in out and "memory-bound" in out


def test_cli_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = transformers.Qwen2Config(**_TINY, tie_word_embeddings=True)
    cfg.save_pretrained(tmp_path)
    model = transformers.Qwen2ForCausalLM(cfg)
    for path in (tmp_path, tmp_path / "config.json"):
        assert _run_cli(["size", "--config", str(path), "--seq-len", "64", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["param_count"] == model.num_parameters()
        assert data["kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 2


@pytest.mark.parametrize("argv", [
    ["size", "--preset", "no-such-model"],
    ["size", "--config", "/nonexistent/dir"],
    ["size"],
    ["size", "--preset", "llama-3-8b", "--dtype", "fp6"],
    ["size", "--preset", "llama-3-8b", "--batch", "0"],
    ["size", "--preset", "llama-3-8b", "--device", "a100"],
], ids=["unknown-preset", "missing-file", "no-source", "bad-dtype", "bad-batch", "bad-device"])
def test_cli_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("kvjax size: error:")


def test_cli_unknown_preset_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["size", "--preset", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "gpt-5" in err and "Llama-3-8B" in err


def test_cli_bad_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert _run_cli(["size", "--config", str(tmp_path)]) == 2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert _run_cli(["size", "--config", str(tmp_path)]) == 2
    assert "bert" in capsys.readouterr().err


def test_storage_dtype_names_array_dtypes_and_rejects_others() -> None:
    assert [storage_dtype(d) for d in (jnp.float32, jnp.bfloat16, np.float16, "int8")] \
        == ["fp32", "bf16", "fp16", "int8"]
    with pytest.raises(ValueError, match="int32"):
        storage_dtype(np.int32)
