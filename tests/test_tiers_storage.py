"""Storage tiers: chained block hashes, the host pool (L2) and the disk store (L3).

The disk store tests run against every backend (raw files, the tensorstore file kvstore).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.cache.paged import PagedCache
from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.block_hash import block_key, chain_keys
from kvjax.memory.disk_store import DiskStore
from kvjax.memory.host_pool import (
    STAGING,
    HostPool,
    HostPoolFullError,
    InvalidSlotError,
    demote,
    promote,
)
from kvjax.memory.tiered_requests import TierConfig

DTYPES = [np.float32, ml_dtypes.bfloat16]
L, S, K, D = 2, 4, 2, 8


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: object) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def random_cache(rng: np.random.Generator, num_pages: int, dtype: object) -> PagedCache:
    cache = PagedCache.init(L, num_pages, S, K, D, jnp.dtype(dtype), jnp.zeros((1, 1), jnp.int32))
    k = rand(rng, (num_pages, L, S, K, D), dtype)
    v = rand(rng, (num_pages, L, S, K, D), dtype)
    return promote(cache, range(num_pages), k, v)


# ---------------------------------------------------------------------------- hashes
def test_block_key_chain_and_namespace() -> None:
    toks = np.arange(12, dtype=np.int64) * 7
    keys = chain_keys("model-a", toks, 4)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert keys[0] == block_key("model-a", None, toks[:4])
    assert keys[1] == block_key("model-a", bytes.fromhex(keys[0]), toks[4:8])
    assert keys[2] == block_key("model-a", keys[1], toks[8:12])  # hex parent accepted
    # any prefix is addressable: a longer sequence shares the first keys
    assert chain_keys("model-a", np.concatenate([toks, [1, 2, 3, 4]]), 4)[:3] == keys
    # namespaces separate models
    assert set(chain_keys("model-b", toks, 4)).isdisjoint(keys)
    # the same block after a different prefix gets a different key
    other = toks.copy()
    other[0] += 1
    assert chain_keys("model-a", other, 4)[1] != keys[1]
    # int32 / int64 / list inputs agree
    assert chain_keys("model-a", toks.astype(np.int32).tolist(), 4) == keys


@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=40),
       st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_block_key_distinct_inputs(a: list[int], b: list[int]) -> None:
    assert (block_key("ns", None, a) == block_key("ns", None, b)) == (a == b)
    assert block_key("ns", None, a) != block_key("ns2", None, a)


def test_block_key_namespace_is_length_prefixed() -> None:
    # "ab" + tokens must not collide with "a" + different bytes
    assert block_key("ab", None, [1]) != block_key("a", None, [1])
    with pytest.raises(ValueError):
        block_key("ns", b"short", [1])
    with pytest.raises(ValueError):
        block_key("ns", None, [-1])


_KEYS_SCRIPT = (
    "import sys, numpy as np; from kvjax.memory.block_hash import chain_keys;"
    "print(' '.join(chain_keys(sys.argv[1], np.arange(1000, 1064) * 3, 16)))"
)


def test_block_keys_equal_across_processes() -> None:
    here = chain_keys("llama-7b", np.arange(1000, 1064) * 3, 16)
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", _KEYS_SCRIPT, "llama-7b"], env=env,
                             capture_output=True, text=True, check=True, timeout=120)
        outs.append(res.stdout.split())
    assert outs[0] == outs[1] == here


# ---------------------------------------------------------------------------- host pool
@pytest.mark.parametrize("staging", STAGING)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_device_host_device_round_trip_bit_exact(dtype: object, staging: str) -> None:
    rng = np.random.default_rng(1)
    cache = random_cache(rng, 6, dtype)
    before_k = np.asarray(cache.k_pages).copy()
    before_v = np.asarray(cache.v_pages).copy()
    pool = HostPool.like(cache, 4, staging=staging)
    assert pool.staging == staging
    slots = pool.allocate(3)
    pool.save_pages(cache, [4, 0, 2], slots)
    # overwrite those pages on device with fresh data, then restore from host
    cache = promote(cache, [4, 0, 2], rand(rng, (3, L, S, K, D), dtype),
                    rand(rng, (3, L, S, K, D), dtype))
    assert np.asarray(cache.k_pages)[:, 4].tobytes() != before_k[:, 4].tobytes()
    cache = pool.restore_pages(cache, slots, [4, 0, 2])
    assert np.asarray(cache.k_pages).tobytes() == before_k.tobytes()
    assert np.asarray(cache.v_pages).tobytes() == before_v.tobytes()
    # restoring into different pages moves exactly those pages
    cache = pool.restore_pages(cache, slots[:1], [5])
    assert np.asarray(cache.k_pages)[:, 5].tobytes() == before_k[:, 4].tobytes()
    st_ = pool.stats
    page_bytes = 2 * L * S * K * D * np.dtype(dtype).itemsize
    assert st_.bytes_to_host == 3 * page_bytes and st_.bytes_to_device == 4 * page_bytes
    assert st_.gbps_to_host > 0 and st_.gbps_to_device > 0


def test_demote_shapes_and_checks() -> None:
    rng = np.random.default_rng(2)
    cache = random_cache(rng, 4, np.float32)
    k, v = demote(cache, [3, 1])
    assert k.shape == (2, L, S, K, D)
    assert k[0].tobytes() == np.asarray(cache.k_pages)[:, 3].tobytes()
    assert v[1].tobytes() == np.asarray(cache.v_pages)[:, 1].tobytes()
    with pytest.raises(ValueError):
        demote(cache, [4])
    with pytest.raises(ValueError):
        promote(cache, [1, 1], np.concatenate([k, k])[:2], np.concatenate([v, v])[:2])
    with pytest.raises(ValueError):
        promote(cache, [1], k[:1].astype(ml_dtypes.bfloat16), v[:1].astype(ml_dtypes.bfloat16))


def test_staging_is_checked_before_any_copy() -> None:
    rng = np.random.default_rng(3)
    cache = random_cache(rng, 4, np.float32)
    for bad in ("pagable", "PINNED", ""):
        with pytest.raises(ValueError, match="staging must be one of"):
            HostPool(2, L, S, K, D, np.float32, staging=bad)
        with pytest.raises(ValueError, match="staging must be one of"):
            demote(cache, [0], staging=bad)
        with pytest.raises(ValueError, match="staging must be one of"):
            TierConfig(host_blocks=2, host_staging=bad)
    # the pinned path returns the same bytes as the pageable one, through either copy
    k0, v0 = demote(cache, [2, 0], staging="pageable")
    k1, v1 = demote(cache, [2, 0], staging="pinned")
    assert k0.tobytes() == k1.tobytes() and v0.tobytes() == v1.tobytes()


def test_host_pool_slot_allocator_errors() -> None:
    pool = HostPool(3, L, S, K, D, np.float32)
    a = pool.allocate(2)
    with pytest.raises(HostPoolFullError):
        pool.allocate(2)
    assert pool.num_free == 1  # nothing taken by the failed call
    with pytest.raises(InvalidSlotError):
        pool.free([a[0], a[0]])
    pool.free([a[0]])
    with pytest.raises(InvalidSlotError):
        pool.free([a[0]])  # double free
    with pytest.raises(InvalidSlotError):
        pool.load([a[0]])  # freed slot is not readable
    with pytest.raises(InvalidSlotError):
        pool.store([7], np.zeros((1, L, S, K, D), np.float32), np.zeros((1, L, S, K, D), np.float32))
    rng = np.random.default_rng(3)
    k, v = rand(rng, (1, L, S, K, D), np.float32), rand(rng, (1, L, S, K, D), np.float32)
    pool.store([a[1]], k, v)
    got_k, got_v = pool.load([a[1]])
    assert got_k.tobytes() == k.tobytes() and got_v.tobytes() == v.tobytes()
    got_k[...] = 0  # a load is a copy
    assert pool.load([a[1]])[0].tobytes() == k.tobytes()
    # freed capacity is reusable and the reused slot holds the new data
    pool.free([a[1]])
    b = pool.allocate(3)
    k2 = rand(rng, (3, L, S, K, D), np.float32)
    pool.store(b, k2, k2)
    assert pool.load(b)[0].tobytes() == k2.tobytes()


@pytest.mark.parametrize("staging", STAGING)
def test_host_pool_blocks_any_staging(staging: str) -> None:
    """``copy_out``/``put``/``take``/``copy_in`` in every staging: bytes round-trip exactly,
    NumPy and pinned blocks mix in one promotion, a taken block survives its slot being
    freed and reused, and "pinned-slots" keeps slots in pinned host memory."""
    rng = np.random.default_rng(4)
    cache = random_cache(rng, 6, ml_dtypes.bfloat16)
    before = np.asarray(cache.k_pages).copy(), np.asarray(cache.v_pages).copy()
    pool = HostPool.like(cache, 3, staging=staging)
    blocks = pool.copy_out(cache, [5, 1])
    slots = pool.allocate(2)
    pool.put(slots, blocks)
    if staging == "pinned-slots":
        kinds = {a.sharding.memory_kind for b in pool.take(slots) for a in b}
        assert kinds == {"pinned_host"}
    taken = pool.take(slots)
    pool.free(slots)
    fresh = rand(rng, (1, L, S, K, D), ml_dtypes.bfloat16)
    pool.store(pool.allocate(1), fresh, fresh)  # may reuse a freed slot
    from_disk = (before[0][:, 3], before[1][:, 3])  # a NumPy block, as the disk tier gives
    cache = pool.copy_in(cache, [0, 2, 4], [*taken, from_disk])
    k, v = np.asarray(cache.k_pages), np.asarray(cache.v_pages)
    for page, src in ((0, 5), (2, 1), (4, 3)):
        assert k[:, page].tobytes() == before[0][:, src].tobytes()
        assert v[:, page].tobytes() == before[1][:, src].tobytes()
    assert k[:, 1].tobytes() == before[0][:, 1].tobytes()  # other pages untouched
    with pytest.raises(ValueError, match="blocks must be"):
        pool.put(pool.allocate(1), [(fresh, fresh)])  # [1, L, S, K, D] is not one page
    with pytest.raises(ValueError, match="page ids but"):
        pool.copy_in(cache, [0, 1], taken[:1])


# ---------------------------------------------------------------------------- disk store
@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _entry(rng: np.random.Generator, dtype: object) -> tuple[str, np.ndarray, np.ndarray]:
    key = block_key("ns", None, rng.integers(0, 1000, 8))
    return key, rand(rng, (L, S, K, D), dtype), rand(rng, (L, S, K, D), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_device_disk_device_round_trip_bit_exact(tmp_path: Path, dtype: object,
                                                 backend: str) -> None:
    rng = np.random.default_rng(4)
    cache = random_cache(rng, 5, dtype)
    before_k = np.asarray(cache.k_pages).copy()
    store = DiskStore(tmp_path / "l3", backend)
    k, v = demote(cache, [1, 3])
    keys = chain_keys("ns", rng.integers(0, 100, 8), 4)
    for i, key in enumerate(keys):
        assert store.put(key, k[i], v[i])
    cache = promote(cache, [1, 3], rand(rng, k.shape, dtype), rand(rng, v.shape, dtype))
    got = [store.get(key) for key in keys]
    assert all(g is not None for g in got)
    gk = np.stack([g[0] for g in got if g is not None])
    gv = np.stack([g[1] for g in got if g is not None])
    assert gk.dtype == np.dtype(dtype)
    cache = promote(cache, [1, 3], gk, gv)
    assert np.asarray(cache.k_pages).tobytes() == before_k.tobytes()
    assert np.asarray(cache.v_pages)[:, 3].tobytes() == v[1].tobytes()
    assert store.stats.hits == 2 and store.stats.bytes_read == store.stats.bytes_written


def test_disk_store_restart_same_and_other_process(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(5)
    entries = [_entry(rng, ml_dtypes.bfloat16) for _ in range(3)]
    first = DiskStore(tmp_path, backend)
    for key, k, v in entries:
        first.put(key, k, v)
    second = DiskStore(tmp_path, backend)
    for key, k, v in entries:
        got = second.get(key)
        assert got is not None
        assert got[0].tobytes() == k.tobytes() and got[1].tobytes() == v.tobytes()
    assert second.stored_keys() == sorted(e[0] for e in entries)
    script = (
        "import sys, hashlib; from kvjax.memory.disk_store import DiskStore;"
        "s = DiskStore(sys.argv[1], sys.argv[2]);"
        "out = [s.get(k) for k in sys.argv[3:]];"
        "print(' '.join(hashlib.sha256(g[0].tobytes() + g[1].tobytes()).hexdigest()"
        " if g is not None else 'MISS' for g in out))"
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path), backend,
                          *(e[0] for e in entries)],
                         env=dict(os.environ, PYTHONHASHSEED="777"), capture_output=True,
                         text=True, check=True, timeout=120)
    import hashlib
    want = [hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest() for _, k, v in entries]
    assert res.stdout.split() == want


def test_disk_store_put_keeps_existing_and_validates(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(6)
    store = DiskStore(tmp_path, backend)
    key, k, v = _entry(rng, np.float32)
    assert store.put(key, k, v)
    assert not store.put(key, k + 1, v)  # kept
    got = store.get(key)
    assert got is not None and got[0].tobytes() == k.tobytes()
    assert store.put(key, k + 1, v, overwrite=True)
    got = store.get(key)
    assert got is not None and got[0].tobytes() == (k + 1).tobytes()
    with pytest.raises(ValueError):
        store.put("not-a-key", k, v)
    with pytest.raises(ValueError):
        store.put(key, k, v[:1])
    with pytest.raises(ValueError):
        DiskStore(tmp_path, "orbax")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [store.path(key).name]
    assert store.stored_keys() == [key]
    assert store.delete(key) and not store.delete(key) and store.get(key) is None


@pytest.mark.parametrize("fault", ["truncate", "flip", "delete", "header", "swap"])
def test_disk_store_faults_are_misses(tmp_path: Path, fault: str, backend: str) -> None:
    rng = np.random.default_rng(7)
    store = DiskStore(tmp_path, backend)
    key, k, v = _entry(rng, ml_dtypes.bfloat16)
    key2, k2, v2 = _entry(rng, ml_dtypes.bfloat16)
    store.put(key, k, v)
    store.put(key2, k2, v2)
    path = store.path(key)
    data = path.read_bytes()
    if fault == "truncate":
        path.write_bytes(data[: len(data) - 5])
        reason = "truncated"
    elif fault == "flip":
        buf = bytearray(data)
        buf[-3] ^= 0x40
        path.write_bytes(bytes(buf))
        reason = "checksum"
    elif fault == "delete":
        path.unlink()
        reason = "missing"
    elif fault == "header":
        path.write_bytes(data[:12] + b"{garbage" + data[20:])
        reason = "corrupt"
    else:  # another entry's file under this key: complete and checksummed, but not ours
        path.write_bytes(store.path(key2).read_bytes())
        reason = "key"
    assert store.get(key) is None
    assert store.stats.misses == 1 and store.stats.miss_reasons[reason] == 1
    assert not path.exists() and not store.contains(key)  # removed: a later put stores it
    got = store.get(key2)  # the other entry is unaffected
    assert got is not None and got[0].tobytes() == k2.tobytes()
    assert store.put(key, k, v)
    got = store.get(key)
    assert got is not None and got[0].tobytes() == k.tobytes() and got[1].tobytes() == v.tobytes()


def test_disk_store_backends_read_each_others_entries(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    written = {}
    for backend in BACKENDS:
        key, k, v = _entry(rng, ml_dtypes.bfloat16)
        assert DiskStore(tmp_path, backend).put(key, k, v)
        written[key] = k.tobytes() + v.tobytes()
    for backend in BACKENDS:
        store = DiskStore(tmp_path, backend)
        assert store.stored_keys() == sorted(written)
        for key, data in written.items():
            got = store.get(key)
            assert got is not None and got[0].tobytes() + got[1].tobytes() == data


def test_disk_store_unwritable_dir_disables_with_one_warning(tmp_path: Path,
                                                            backend: str) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:
            (ro / "probe").write_bytes(b"x")
            (ro / "probe").unlink()
            pytest.skip("chmod does not stop writes here (running as root)")
        except OSError:
            pass
        with pytest.warns(RuntimeWarning, match="DiskStore disabled"):
            store = DiskStore(ro / "sub", backend)
        assert not store.enabled
    finally:
        ro.chmod(0o755)


def test_disk_store_blocked_dir_and_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              disk_full: Callable[[str], None],
                                              backend: str) -> None:
    # a regular file where the directory should be: cannot create (works as root too)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.warns(RuntimeWarning, match="DiskStore disabled"):
        blocked = DiskStore(tmp_path / "file" / "l3", backend)
    rng = np.random.default_rng(8)
    key, k, v = _entry(rng, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled: no further warnings
        assert not blocked.put(key, k, v)
        assert blocked.get(key) is None
        assert not blocked.contains(key)
    assert blocked.stats.miss_reasons["disabled"] == 1

    store = DiskStore(tmp_path / "ok", backend)
    key2, k2, v2 = _entry(rng, np.float32)
    assert store.put(key2, k2, v2)
    disk_full(backend)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert not store.put(key, k, v)
    monkeypatch.undo()
    assert not store.enabled and store.get(key2) is None  # disabled: misses, no wrong data
    assert store.disabled_reason is not None and "No space left" in store.disabled_reason
    # only the entry written before: no temp file left behind
    assert [p.name for p in (tmp_path / "ok").rglob("*") if p.is_file()] == [
        store.path(key2).name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not store.put(key, k, v)
