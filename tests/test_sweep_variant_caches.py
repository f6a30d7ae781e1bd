"""Every attention variant the sweep trains (MHA, GQA, MQA, MLA at two ranks), built by
``build_config`` as the sweep builds it: the cache buffers ``generate`` allocates hold
exactly the bytes per token the sizing calculator reports, and greedy generation over
the dense and the paged cache is token-identical to recomputing without a cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.analysis.sizing import kv_bytes_per_token
from kvjax.analysis.spec import ArchSpec
from kvjax.cache import PagedCache
from kvjax.cache.paged_latent import PagedLatentCache
from kvjax.data import SyntheticCorpus
from kvjax.engine.generate import CacheKind, dense_cache, generate
from kvjax.models.mla import MLAConfig
from kvjax.train import BaseShape, Variant, build_config, init_params, model_for
from kvjax.train.loop import Model

SHAPE = BaseShape(vocab_size=SyntheticCorpus(seq_len=64).vocab.size, hidden_size=32,
                  num_layers=2, num_heads=4, head_dim=8, intermediate_size=64,
                  max_position_embeddings=64, mla_rope_head_dim=4)
VARIANTS = ["mha", "gqa-2", "mqa", "mla-6", "mla-12"]
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _model(name: str, dtype: Any) -> Model:
    return model_for(build_config(Variant.parse(name, SHAPE.num_heads), SHAPE, 64), dtype)


def _float_bytes(cache: Any) -> int:
    """Bytes of the cache's floating-point buffers (K/V or latent rows; not its tables
    or lengths)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache)
               if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cache_buffers_match_the_sizing_calculator(name: str, dtype: str) -> None:
    model = _model(name, DTYPES[dtype])
    want = kv_bytes_per_token(ArchSpec.from_config(model.cfg, name), dtype)
    batch, max_len = 3, 40
    assert _float_bytes(dense_cache(model, batch, max_len)) == want * batch * max_len
    pages, page = 7, 16
    tables = jnp.zeros((batch, 2), jnp.int32)
    cfg = model.cfg
    paged: PagedCache | PagedLatentCache
    if isinstance(cfg, MLAConfig):
        paged = PagedLatentCache.init(cfg.num_layers, pages, page, cfg.latent_width,
                                      DTYPES[dtype], tables, rope_key_heads=cfg.rope_key_heads)
    else:
        paged = PagedCache.init(cfg.num_layers, pages, page, cfg.num_kv_heads, cfg.head_dim,
                                DTYPES[dtype], tables)
    assert _float_bytes(paged) == want * pages * page


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_recomputation(name: str) -> None:
    model = _model(name, jnp.float32)
    # Weights large enough that greedy choices are decided by clear margins.
    params = init_params(model, seed=int(np.random.default_rng().integers(1 << 20)),
                         scale=0.3)
    rng = np.random.default_rng()
    vocab = SHAPE.vocab_size
    prompts = [rng.integers(4, vocab, n).tolist() for n in (1, 7, 19)]
    ref = generate(model, params, prompts, max_new_tokens=12, cache="none").tokens
    assert [len(t) for t in ref] == [12, 12, 12]
    caches: tuple[CacheKind, ...] = ("dense", "paged")
    for cache in caches:
        out = generate(model, params, prompts, max_new_tokens=12, cache=cache, block_size=4,
                       attention="xla")
        assert out.tokens == ref, cache
