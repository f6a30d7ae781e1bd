"""The absorbed-MLA paged decode kernel (Pallas, interpret mode on CPU) against a float64
NumPy reference, the jnp reference beside it, and the model's absorbed attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.models.mla import attend_absorbed
from pallas_kernels.mla_decode import mla_decode_attention, mla_decode_reference


def numpy_reference(q_lat: np.ndarray, q_rope: np.ndarray, pages: np.ndarray,
                    tables: np.ndarray, lengths: np.ndarray, scale: float) -> np.ndarray:
    """Loop form in float64: each sequence's visible rows, one softmax per head."""
    q_lat, q_rope, pages = (np.asarray(x, np.float64) for x in (q_lat, q_rope, pages))
    batch, heads, rank = q_lat.shape
    num_pages, page_size, _ = pages.shape
    out = np.zeros((batch, heads, rank))
    for b in range(batch):
        rows = [pages[tables[b, t // page_size], t % page_size] for t in range(lengths[b])
                if 0 <= tables[b, t // page_size] < num_pages]
        if not rows:
            continue
        r = np.stack(rows)  # [T, W]
        s = (q_lat[b] @ r[:, :rank].T + q_rope[b] @ r[:, rank:].T) * scale  # [H, T]
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[b] = (p / p.sum(axis=1, keepdims=True)) @ r[:, :rank]
    return out


def make_case(seed: int, batch: int, heads: int, rank: int, rope: int, page: int,
              max_blocks: int, lengths: list[int], dtype: jnp.dtype, missing: bool = False
              ) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    num_pages = batch * max_blocks + 3
    q_lat = jnp.asarray(rng.standard_normal((batch, heads, rank)), dtype)
    q_rope = jnp.asarray(rng.standard_normal((batch, heads, rope)), dtype)
    pages = jnp.asarray(rng.standard_normal((num_pages, page, rank + rope)), dtype)
    tables = rng.permutation(num_pages)[: batch * max_blocks].reshape(batch, max_blocks)
    if missing:
        tables[0, 0] = -1
        tables[-1, -1] = num_pages + 7
    return q_lat, q_rope, pages, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)


CASES = [  # batch, heads, rank, rope, page, max_blocks, lengths, splits, ppb, heads/block
    (3, 16, 64, 16, 16, 5, [80, 1, 37], None, 4, 16),
    (2, 3, 32, 8, 8, 7, [0, 53], 2, 2, 2),  # empty sequence, odd heads, partial head block
    (4, 1, 128, 64, 16, 3, [48, 17, 33, 16], 3, 1, 16),
    (2, 20, 48, 16, 32, 4, [128, 65], 1, 8, 8),  # blocks of 8, 8, 4 heads
    (3, 12, 32, 16, 8, 6, [45, 0, 9], None, 2, 4),  # 3 head blocks x auto splits
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_float64_reference(case: tuple, dtype: jnp.dtype) -> None:
    batch, heads, rank, rope, page, blocks, lengths, splits, ppb, hpb = case
    args = make_case(len(lengths) + heads, batch, heads, rank, rope, page, blocks, lengths, dtype)
    scale = (rank // 2 + rope) ** -0.5
    out = mla_decode_attention(*args, scale=scale, num_splits=splits, pages_per_block=ppb,
                               heads_per_block=hpb, interpret=True)
    assert out.shape == (batch, heads, rank) and out.dtype == dtype
    want = numpy_reference(*(np.asarray(a.astype(jnp.float32)) if a.dtype != jnp.int32
                             else np.asarray(a) for a in args), scale)
    got = np.asarray(out, np.float64)
    assert np.all(np.isfinite(got))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
    ref = np.asarray(mla_decode_reference(*args, scale=scale), np.float64)
    assert np.linalg.norm(ref - want) <= tol * np.linalg.norm(want)
    for b, n in enumerate(lengths):
        if n == 0:
            assert not got[b].any()  # empty sequence: exact zeros


def test_missing_pages_are_skipped_and_layer_stacked_pool_read_in_place() -> None:
    q_lat, q_rope, pages, tables, lengths = make_case(7, 2, 4, 32, 16, 8, 4, [30, 32],
                                                      jnp.float32, missing=True)
    scale = 0.2
    want = numpy_reference(np.asarray(q_lat), np.asarray(q_rope), np.asarray(pages),
                           np.asarray(tables), np.asarray(lengths), scale)
    got = mla_decode_attention(q_lat, q_rope, pages, tables, lengths, scale=scale,
                               num_splits=2, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    other = jnp.asarray(np.random.default_rng(8).standard_normal(pages.shape), jnp.float32)
    stacked = jnp.stack([other, pages, other])
    got_layer = mla_decode_attention(q_lat, q_rope, stacked, tables, lengths, scale=scale,
                                     num_splits=2, layer=1, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_layer), np.asarray(got))


def test_kernel_then_value_projection_equals_the_models_absorbed_attention() -> None:
    """kernel(q_nope W_uk, q_rope) W_uv == attend_absorbed over the same rows (float32)."""
    rng = np.random.default_rng(11)
    batch, heads, rank, rope, dn, dv, page, blocks = 2, 4, 32, 16, 24, 20, 8, 4
    lengths = np.asarray([27, 9])
    q_nope = jnp.asarray(rng.standard_normal((batch, 1, heads, dn)), jnp.float32)
    q_rope = jnp.asarray(rng.standard_normal((batch, 1, heads, rope)), jnp.float32)
    w_kvb = jnp.asarray(rng.standard_normal((rank, heads, dn + dv)) * 0.2, jnp.float32)
    rows = jnp.asarray(rng.standard_normal((batch, blocks * page, rank + rope)), jnp.float32)
    # contiguous rows of each sequence laid out on scrambled pages
    tables = rng.permutation(batch * blocks).reshape(batch, blocks)
    pages = np.zeros((batch * blocks, page, rank + rope), np.float32)
    for b in range(batch):
        for j in range(blocks):
            pages[tables[b, j]] = np.asarray(rows[b, j * page:(j + 1) * page])
    scale = (dn + rope) ** -0.5
    mask = jnp.asarray(np.arange(blocks * page)[None, None] < lengths[:, None, None])
    want = attend_absorbed(q_nope, q_rope, rows, w_kvb, mask, rope_key_heads=1, scale=scale)
    q_lat = jnp.einsum("bhd,rhd->bhr", q_nope[:, 0], w_kvb[..., :dn])
    out_lat = mla_decode_attention(q_lat, q_rope[:, 0], jnp.asarray(pages),
                                   jnp.asarray(tables, jnp.int32),
                                   jnp.asarray(lengths, jnp.int32), scale=scale,
                                   interpret=True)
    got = jnp.einsum("bhr,rhd->bhd", out_lat, w_kvb[..., dn:])
    err = np.linalg.norm(np.asarray(got - want[:, 0])) / np.linalg.norm(np.asarray(want))
    assert err <= 1e-5


@pytest.mark.parametrize(("change", "match"), [
    ({"q_rope": lambda a: a[..., :-1]}, "only one RoPE key head"),
    ({"q_lat": lambda a: a.astype(jnp.bfloat16)}, "share a dtype"),
    ({"pages": lambda a: a[:, :12]}, "page_size 12 unsupported"),
    ({"lengths": lambda a: a + 100}, "lengths must lie in"),
    ({"lengths": lambda a: a[:1]}, "batch mismatch"),
    ({"tables": lambda a: a.astype(jnp.float32)}, "must be integer"),
    ({"q_lat": lambda a: a[0]}, "rank 3"),
])
def test_bad_arguments_raise_before_running(change: dict, match: str) -> None:
    q_lat, q_rope, pages, tables, lengths = make_case(3, 2, 4, 32, 16, 16, 2, [5, 20],
                                                      jnp.float32)
    named = {"q_lat": q_lat, "q_rope": q_rope, "pages": pages, "tables": tables,
             "lengths": lengths}
    for key, fn in change.items():
        named[key] = fn(named[key])
    with pytest.raises(ValueError, match=match):
        mla_decode_attention(named["q_lat"], named["q_rope"], named["pages"], named["tables"],
                             named["lengths"], scale=0.1, interpret=True)


def test_bad_settings_raise() -> None:
    args = make_case(4, 1, 2, 32, 16, 16, 2, [3], jnp.float32)
    for kw, match in (({"num_splits": 0}, "num_splits"), ({"pages_per_block": 0},
                                                          "pages_per_block"),
                      ({"layer": 0}, "rank 4"), ({"heads_per_block": 0}, "heads_per_block"),
                      ({"heads_per_block": True}, "heads_per_block")):
        with pytest.raises(ValueError, match=match):
            mla_decode_attention(*args, scale=0.1, interpret=True, **kw)


def test_benchmark_smoke_run_writes_small_errors(tmp_path: object, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    """benchmarks/mla_decode.py --smoke: every kernel setting runs and matches the XLA path."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mla_decode.py"
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke"])
    runpy.run_path(str(script), run_name="__main__")
    rows = json.loads((Path(str(tmp_path)) / "mla_decode.json").read_text())["rows"]
    errs = [v for k, v in rows[0].items() if k.endswith(" err")]
    times = [v for k, v in rows[0].items() if k.startswith("kvjax") and not k.endswith(" err")]
    assert len(errs) == len(times) == 6
    assert max(errs) < 1e-5 and min(times) > 0


@pytest.mark.parametrize("heads_per_block", [16, 64])
def test_lowers_for_gpu_through_triton_at_deepseek_shape(heads_per_block: int) -> None:
    """Lowered for CUDA (no GPU needed) at DeepSeek-V2's shape (128 heads, rank 512,
    RoPE 64, bf16, page 16, a layer-stacked pool), the head-blocked kernel goes through
    Pallas's Triton path."""
    batch, heads, rank, rope, page, blocks = 2, 128, 512, 64, 16, 8
    q_lat = jnp.zeros((batch, heads, rank), jnp.bfloat16)
    q_rope = jnp.zeros((batch, heads, rope), jnp.bfloat16)
    pool = jnp.zeros((2, batch * blocks, page, rank + rope), jnp.bfloat16)
    tables = jnp.arange(batch * blocks, dtype=jnp.int32).reshape(batch, blocks)
    lengths = jnp.full((batch,), page * blocks, jnp.int32)
    run = jax.jit(lambda *a: mla_decode_attention(*a, scale=0.07, layer=1, num_splits=2,
                                                  pages_per_block=2,
                                                  heads_per_block=heads_per_block))
    text = run.trace(q_lat, q_rope, pool, tables, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower()
