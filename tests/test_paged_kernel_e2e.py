"""End to end: greedy generation with the Pallas kernels (interpreted: chunked prefill for
the prompt, decode for each new token) in the paged cache is token-identical to the dense
cache in float32."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from kvjax.engine import generate as generate_module
from kvjax.engine.generate import generate, resolve_attention
from kvjax.models import LoadedModel, load_checkpoint
from kvjax.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """head_dim 64 (the kernel's smallest), GQA 4:2."""
    path: Path = build_tiny_checkpoint(tmp_path_factory.mktemp("wide"), family="qwen2",
                                       hidden_size=256, num_heads=4, num_kv_heads=2,
                                       intermediate_size=256, max_position_embeddings=256,
                                       seed=5, weight_std=0.15)
    return load_checkpoint(path)


def test_kernel_path_token_identical_to_dense(wide_heads: LoadedModel) -> None:
    lm = wide_heads
    assert lm.config.head_dim == 64
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (1, 7, 8, 21)]
    limits = [12, 5, 12, 9]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="dense")
    kernel = generate(lm.model, lm.params, prompts, max_new_tokens=limits, cache="paged",
                      block_size=8, attention="pallas-interpret")
    assert kernel.tokens == dense.tokens
    assert [len(t) for t in kernel.tokens] == limits


def test_attention_selection(wide_heads: LoadedModel) -> None:
    assert resolve_attention("auto", 16, 64) == "xla"  # CPU: the kernels are GPU-only
    assert resolve_attention("pallas-interpret", 16, 64) == "pallas-interpret"
    with pytest.raises(ValueError, match="attention 'triton' cannot run here: JAX's default"):
        generate(wide_heads.model, wide_heads.params, [[3, 4]], max_new_tokens=2,
                 cache="paged", block_size=8, attention="triton")
    with pytest.raises(ValueError, match="head_dim in"):
        generate(wide_heads.model, wide_heads.params, [[3, 4]], max_new_tokens=2,
                 cache="paged", block_size=4, attention="pallas-interpret")
    with pytest.raises(ValueError, match="attention must be one of"):
        generate(wide_heads.model, wide_heads.params, [[3, 4]], max_new_tokens=2,
                 cache="paged", attention="cuda")


def test_auto_on_gpu_prefers_triton(monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """On a GPU "auto" is the Triton kernel when it can launch (logged with its launcher
    once the run's checks pass), else the Pallas one (the reason logged); XLA when the
    page layout does not suit the kernels."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(generate_module, "triton_unavailable_reason", lambda: None)
    monkeypatch.delenv("KVJAX_TRITON_LAUNCH", raising=False)
    assert resolve_attention("auto", 16, 128) == "triton"
    assert generate_module.attention_label("triton") == "triton, launched by xla"
    assert generate_module.attention_label("xla") == "xla"
    assert resolve_attention("auto", 4, 128) == "xla"
    monkeypatch.setattr(generate_module, "triton_unavailable_reason",
                        lambda: "cannot import jax_triton: no module")
    with caplog.at_level(logging.INFO, logger="kvjax.engine.generate"):
        assert resolve_attention("auto", 16, 128) == "pallas"
    assert "Triton decode kernel unavailable (cannot import jax_triton" in caplog.text


def test_triton_backend_sends_chunks_to_the_prefill_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "triton" a step of several new tokens runs the Triton chunked-prefill kernel
    (here stood in for by the Pallas one, interpreted: same contract) with the step's
    chunk lengths and ends, and equals the XLA reference; a one-token step goes to the
    Triton decode kernel that also writes the token (``triton_paged_decode_append``). (The Triton kernels themselves run in Triton's interpreter in
    ``test_triton_*``.)"""
    import dataclasses

    import jax.numpy as jnp

    from kvjax.cache import paged as paged_module
    from kvjax.cache.paged import PagedCache

    calls: list[str] = []
    real_prefill = paged_module.paged_prefill_attention

    def prefill(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("prefill")
        return real_prefill(*args, **{**kwargs, "interpret": True})

    def pallas(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the triton backend called a Pallas kernel")

    def decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("decode")
        raise RuntimeError("decode kernel reached")

    monkeypatch.setattr(paged_module, "triton_paged_prefill_attention", prefill)
    monkeypatch.setattr(paged_module, "paged_prefill_attention", pallas)
    monkeypatch.setattr(paged_module, "triton_paged_decode_append", decode)
    rng = np.random.default_rng(3)
    batch, new, heads, kv_heads, dim, page = 2, 5, 4, 2, 64, 8
    tables = jnp.asarray(rng.permutation(8).reshape(batch, 4), jnp.int32)
    xla = PagedCache.init(1, 8, page, kv_heads, dim, jnp.float32, tables)
    triton = dataclasses.replace(xla, attention="triton")
    q, k, v = (jnp.asarray(rng.standard_normal((batch, new, h, dim)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    positions = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]], jnp.int32)
    want, _ = xla.update_and_attend(0, q, k, v, positions)
    got, _ = triton.update_and_attend(0, q, k, v, positions)
    assert calls == ["prefill"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="decode kernel reached"):
        triton.update_and_attend(0, q[:, :1], k[:, :1], v[:, :1], positions[:, :1])
    assert calls == ["prefill", "decode"]


def test_survives_removal_of_pallas_triton_lowering() -> None:
    """With ``jax.experimental.pallas.triton`` gone (as JAX will remove it), the package
    still imports, the XLA path and the interpreter run, and a Pallas GPU kernel raises a
    clear error naming the backends that remain."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # import now fails
import jax.numpy as jnp
import numpy as np
import kvjax.engine.engine, pallas_kernels.triton_chunked_prefill, pallas_kernels.mla_decode
from kvjax.cache.paged import PagedCache
from pallas_kernels.paged_decode import triton_compiler_params
tables = jnp.arange(4, dtype=jnp.int32).reshape(1, 4)
for attention in ("xla", "pallas-interpret"):
    cache = PagedCache.init(1, 4, 8, 2, 64, jnp.float32, tables, attention=attention)
    q = jnp.ones((1, 3, 4, 64)); kv = jnp.ones((1, 3, 2, 64))
    out, _ = cache.update_and_attend(0, q, kv, kv, jnp.arange(3, dtype=jnp.int32)[None])
    assert np.isfinite(np.asarray(out)).all()
try:
    triton_compiler_params(4, 2)
except RuntimeError as err:
    print("clear error:", err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clear error: this JAX has no Pallas Triton lowering" in done.stdout


def test_prefix_cached_generation_on_the_kernels_matches_dense(wide_heads: LoadedModel
                                                               ) -> None:
    """PrefixCachedGenerator(attention="pallas-interpret"): the suffix after a cache hit
    is prefilled by the chunked-prefill kernel over the cached pages, decoding by the
    decode kernel; greedy outputs equal the dense cache's in float32, and the later
    prompts really hit the shared prefix."""
    from kvjax.engine.prefix_generate import PrefixCachedGenerator

    lm = wide_heads
    rng = np.random.default_rng(31)
    shared = rng.integers(3, lm.config.vocab_size, 19).tolist()  # 2 full blocks of 8
    prompts = [shared + rng.integers(3, lm.config.vocab_size, n).tolist() for n in (5, 1, 12)]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=6, cache="dense")
    gen = PrefixCachedGenerator(lm.model, lm.params, num_blocks=32, block_size=8,
                                attention="pallas-interpret")
    assert gen.attention == "pallas-interpret"
    out, stats = gen.generate(prompts, max_new_tokens=6)
    assert out.tokens == dense.tokens
    assert [r.hit_tokens for r in stats.requests] == [0, 16, 16]
    with pytest.raises(ValueError, match="head_dim in"):
        PrefixCachedGenerator(lm.model, lm.params, num_blocks=32, block_size=4,
                              attention="pallas-interpret")
    assert PrefixCachedGenerator(lm.model, lm.params, num_blocks=8, block_size=8,
                                 attention="auto").attention == "xla"  # CPU


def test_tiered_generation_on_the_kernels_matches_dense(wide_heads: LoadedModel) -> None:
    """A 6-page L1 over 16 host slots on the interpreted kernels: the second pass over
    the prompts promotes their prefixes from L2 and prefills only the suffixes through the
    chunked-prefill kernel; every output equals the dense cache's (float32)."""
    from kvjax.engine.prefix_generate import PrefixCachedGenerator
    from kvjax.memory.tiered_requests import TierConfig

    lm = wide_heads
    rng = np.random.default_rng(32)
    prompts = [rng.integers(3, lm.config.vocab_size, 26).tolist() for _ in range(3)]
    dense = generate(lm.model, lm.params, prompts, max_new_tokens=4, cache="dense")
    gen = PrefixCachedGenerator(lm.model, lm.params, num_blocks=6, block_size=8,
                                tiers=TierConfig(host_blocks=16), attention="pallas-interpret")
    outs = []
    for _ in range(2):
        for p in prompts:
            out, _ = gen.generate([p], max_new_tokens=4)
            outs += out.tokens
    assert outs == dense.tokens * 2
    stats = gen.tier_stats()
    assert stats["blocks"]["l2_to_l1"] > 0, stats  # promotions really happened
