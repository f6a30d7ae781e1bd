"""The fused decode step (the layer kernels and the decode-append kernel in Triton's
interpreter) against the Flax model over the XLA paged cache, and the serving engine's
bursts through it token-identical to the dense cache (float32)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from triton_testing import interpreted_jax_triton  # noqa: F401

from kvjax.cache import paged
from kvjax.cache.paged import PagedCache
from kvjax.engine.generate import generate
from kvjax.models import LoadedModel, load_checkpoint
from kvjax.models.fused_decode import FusedLaunch, check_fusable, fused_decode_step
from kvjax.models.tiny import build_tiny_checkpoint


def _checkpoint(tmp: Path, family: str, **kw: object) -> LoadedModel:
    path = build_tiny_checkpoint(tmp, family=family, hidden_size=256, num_heads=4,  # type: ignore[arg-type]
                                 intermediate_size=192, max_position_embeddings=256,
                                 weight_std=0.15, **kw)  # type: ignore[arg-type]
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """q/k/v biases, tied embeddings, GQA 4:2, head_dim 64."""
    return _checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", num_kv_heads=2, seed=3,
                       tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """q/k/v/o biases (attention_bias), Llama-3 RoPE scaling, MQA, separate LM head."""
    return _checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_kv_heads=1, seed=4,
                       attention_bias=True, llama3_rope_scaling=True,
                       tie_word_embeddings=False)


@pytest.fixture
def triton_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paged, "triton_unavailable_reason", lambda: None)


MIXED = FusedLaunch.from_dict({"qkv": "xla", "o_proj": {"block_n": 16, "block_k": 64,
                                                        "split_k": 2},
                               "gate_up": "xla",
                               "down": {"block_k": 64, "split_k": 3, "num_stages": 2}})
TUNED_QKV = FusedLaunch.from_dict({"qkv": {"block_k": 64, "split_k": 4}, "o_proj": "xla",
                                   "gate_up": {"block_n": 32, "block_k": 32}, "down": "xla"})

# the launch picked on an H100 for Qwen2.5-0.5B's widths, shipped for users (docs/serving-engine.md)
SHIPPED = FusedLaunch.from_json(Path(__file__).resolve().parents[1] / "configs"
                                / "fused-launch-qwen2.5-0.5b-h100.json")


@pytest.mark.parametrize(("name", "launch"), [("qwen2", None), ("llama", None),
                                              ("llama", MIXED), ("qwen2", TUNED_QKV),
                                              ("qwen2", SHIPPED)])
def test_fused_step_matches_flax_forward(name: str, launch: FusedLaunch | None,
                                         request: pytest.FixtureRequest) -> None:
    """Logits and the written pools of one decode step equal the Flax forward's over the
    XLA paged cache: rows at different lengths, a padding row (position -1), scrambled
    block tables; every piece a kernel at its defaults, or pieces left to XLA and
    kernels at split contractions."""
    lm: LoadedModel = request.getfixturevalue(name)
    cfg = lm.config
    rng = np.random.default_rng(21)
    batch, page, per_row = 5, 8, 6
    num_pages = batch * per_row + 3
    tables = rng.permutation(num_pages)[:batch * per_row].reshape(batch, per_row)
    tables = jnp.asarray(tables, jnp.int32)
    positions = jnp.asarray([0, 7, 8, 30, -1], jnp.int32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
    shape = (cfg.num_layers, num_pages, page, cfg.num_kv_heads, cfg.head_dim)
    k = jnp.asarray(rng.normal(size=shape), jnp.float32)
    v = jnp.asarray(rng.normal(size=shape), jnp.float32)

    cache = PagedCache(k_pages=k, v_pages=v, block_tables=tables,
                       lengths=jnp.maximum(positions, 0), attention="xla")
    want, new = lm.model.apply({"params": lm.params}, tokens[:, None], positions[:, None],
                               cache, logit_index=jnp.zeros_like(tokens))
    got, k2, v2 = fused_decode_step(lm.params, cfg, tokens, positions, k, v, tables, launch)
    real = np.asarray(positions) >= 0
    assert got.shape == (batch, cfg.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(k2), np.asarray(new.k_pages), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v2), np.asarray(new.v_pages), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(np.asarray(k2), np.asarray(k))  # something was written


@pytest.mark.usefixtures("triton_allowed")
def test_engine_fused_bursts_token_identical_to_dense(qwen2: LoadedModel) -> None:
    """Overlapped 3-step bursts through the fused step (and single steps and prompt chunks
    through the Flax forward with the Triton kernels) give the dense cache's tokens, and
    every block is returned; the launch given as a mapping (q/k/v left to XLA, the down
    projection's contraction split)."""
    from kvjax.engine.engine import Engine

    lm = qwen2
    rng = np.random.default_rng(23)
    prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (1, 19, 10, 4)]
    limits = [9, 6, 8, 11]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="dense")
    engine = Engine(lm.model, lm.params, num_blocks=20, block_size=8, max_batch=4,
                    prefill_chunk=8, decode_steps=3, overlap_bursts=True, attention="triton",
                    fused_decode=True,
                    fused_launch={"qkv": "xla", "down": {"block_k": 64, "split_k": 3}})
    assert engine.fused_launch is not None and engine.fused_launch.settings("qkv") is None
    out = engine.generate(prompts, max_new_tokens=limits)
    assert out.tokens == dense.tokens
    assert any(s.decode_steps == 3 for s in engine.step_metrics)
    assert engine.pool_stats().num_sequences == 0


@pytest.mark.usefixtures("triton_allowed")
def test_engine_fused_decode_rejections(qwen2: LoadedModel) -> None:
    from kvjax.engine.engine import Engine

    lm = qwen2
    with pytest.raises(ValueError, match="fused_decode needs attention 'triton'"):
        Engine(lm.model, lm.params, num_blocks=8, block_size=8, attention="xla",
               fused_decode=True)
    with pytest.raises(ValueError, match="fused_decode must be a bool"):
        Engine(lm.model, lm.params, num_blocks=8, block_size=8, attention="xla",
               fused_decode=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused_launch is only used with fused_decode"):
        Engine(lm.model, lm.params, num_blocks=8, block_size=8, attention="xla",
               fused_launch={"qkv": "xla"})
    with pytest.raises(ValueError, match="unknown pieces"):
        Engine(lm.model, lm.params, num_blocks=8, block_size=8, attention="triton",
               fused_decode=True, fused_launch={"attn": "xla"})
    with pytest.raises(ValueError, match="head_dim a power of two >= 32"):
        check_fusable(dataclasses.replace(lm.config, head_dim=48))


def test_fused_launch_forms_and_rejections(tmp_path: Path) -> None:
    """Mappings, (keyword, value) pairs and JSON give one hashable launch; bad pieces,
    keywords and values are rejected by name."""
    launch = FusedLaunch.from_dict({"qkv": "xla", "down": {"split_k": 4, "block_n": 64}})
    assert launch.settings("qkv") is None
    assert launch.settings("down") == {"block_n": 64, "split_k": 4}
    assert launch.settings("o_proj") == {"block_n": 16}  # a piece left out keeps its default
    assert launch == FusedLaunch(**dataclasses.asdict(launch))  # the pairs' form
    assert hash(launch) == hash(FusedLaunch.from_dict(launch.to_dict()))
    (tmp_path / "a.json").write_text(json.dumps(launch.to_dict()))
    (tmp_path / "b.json").write_text(json.dumps({"device": "x", "fused_launch": launch.to_dict()}))
    assert FusedLaunch.from_json(tmp_path / "a.json") == launch
    assert FusedLaunch.from_json(tmp_path / "b.json") == launch
    assert FusedLaunch() != launch
    for bad, match in [({"mlp": "xla"}, "unknown pieces"),
                       ({"gate_up": {"split_k": 2}}, "unknown settings"),
                       ({"qkv": {"block_k": 0}}, "block_k must be an int >= 1"),
                       ({"qkv": {"num_warps": True}}, "num_warps must be an int"),
                       ({"down": "cublas"}, "expected 'xla'"),
                       ({"down": [1, 2, 3]}, "pairs")]:
        with pytest.raises(ValueError, match=match):
            FusedLaunch.from_dict(bad)
    with pytest.raises(ValueError, match="must be a mapping"):
        FusedLaunch.from_dict(["qkv"])  # type: ignore[arg-type]


def test_pick_launch_takes_the_faster_form_per_piece() -> None:
    """The sweep's pick: per piece the settings with the least time summed over the
    batches (measured at every batch), XLA where that is faster, the default where a
    piece was not measured at every batch."""
    spec = importlib.util.spec_from_file_location(
        "fused_layer_kernels", Path(__file__).resolve().parents[1] / "benchmarks"
        / "fused_layer_kernels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pick_launch = module.pick_launch

    def row(batch: int, kernel: str, us: float, xla_us: float, **st: int) -> dict[str, object]:
        return {"batch": batch, "kernel": kernel, "settings": st, "us": us, "xla_us": xla_us}

    rows = [row(8, "down_proj", 5.0, 6.0, split_k=4), row(32, "down_proj", 9.0, 8.0, split_k=4),
            row(8, "down_proj", 4.0, 6.0, split_k=8), row(32, "down_proj", 11.0, 8.0, split_k=8),
            row(8, "down_proj", 1.0, 6.0, split_k=2),  # fast, but not measured at 32 rows
            row(8, "norm_qkv_rope", 5.0, 3.0, block_k=64), row(32, "norm_qkv_rope", 6.0, 4.0,
                                                                block_k=64),
            row(8, "o_proj", 2.0, 3.0, block_n=16)]  # not at 32 rows: keeps the default
    launch, detail = pick_launch(rows, [8, 32])
    assert launch.settings("down") == {"split_k": 4}  # 14 us summed against 15 and XLA's 14+
    assert detail["down"]["kernel_us_sum"] == 14.0 and detail["down"]["xla_us_sum"] == 14.0
    assert launch.settings("qkv") is None  # XLA: 7 us against 11
    assert launch.settings("o_proj") == FusedLaunch().settings("o_proj")
    assert launch.settings("gate_up") == {}
