"""TieredPrefixCache: residency across device pages (L1), host slots (L2) and disk (L3)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.cache.paged import PagedCache
from kvjax.memory.allocator import OutOfBlocksError
from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.disk_store import DEFAULT_BACKEND, DiskStore
from kvjax.memory.hicache import L1, L2, L3, WRITE_POLICIES, Prefetch, TieredPrefixCache
from kvjax.memory.host_pool import STAGING, HostPool, demote, promote
from kvjax.memory.radix import RadixNode
from kvjax.memory.tiered_requests import PREFETCH_POLICIES, TierConfig, TieredRequests

L, S, K, D = 2, 2, 1, 4
DTYPE = ml_dtypes.bfloat16
DISKS = st.sampled_from((None, *BACKENDS))  # no L3, or an L3 of each backend


def block_data(key: str, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The K/V a block with chained key ``key`` holds: fresh random bytes fixed by the key."""
    rng = np.random.default_rng([int(key[:16], 16), salt])
    return (rng.standard_normal((L, S, K, D)).astype(DTYPE),
            rng.standard_normal((L, S, K, D)).astype(DTYPE))


def make(tmp_path: Path | None, pages: int, slots: int, ns: str = "m",
         policy: str = "write_back", backend: str = DEFAULT_BACKEND,
         staging: str = "pageable") -> TieredPrefixCache:
    cache = PagedCache.init(L, pages, S, K, D, jnp.bfloat16, jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(99)  # garbage in every page: unwritten data is never zeros
    cache = promote(cache, range(pages), rng.standard_normal((pages, L, S, K, D)).astype(DTYPE),
                    rng.standard_normal((pages, L, S, K, D)).astype(DTYPE))
    disk = DiskStore(tmp_path, backend) if tmp_path is not None else None
    return TieredPrefixCache(cache, HostPool.like(cache, slots, staging=staging), disk,
                             namespace=ns, write_policy=policy)


def write(tc: TieredPrefixCache, tokens: list[int]) -> tuple[int, RadixNode]:
    """Serve a request: fetch its cached prefix into L1, "compute" the rest, insert it all.

    Returns (tokens fetched from the tiers, node ending the cached sequence)."""
    keys = tc.keys(tokens)
    length, node, pages = tc.fetch(tokens)
    tc.tree.lock(node)
    try:
        new = tc.allocate_pages(len(keys) - len(pages))
    finally:
        tc.tree.unlock(node)
    if new:
        data = [block_data(key) for key in keys[len(pages):]]
        tc.cache = promote(tc.cache, new, np.stack([d[0] for d in data]),
                           np.stack([d[1] for d in data]))
    tc.insert(tokens, pages + new)
    return length, tc.tree.match_prefix(tokens)[1]


def verify(tc: TieredPrefixCache) -> None:
    """Every block any tier claims holds exactly the bytes written for its tokens."""
    tc.check_invariants()
    l1 = tc.l1_pages
    if l1:
        k, v = demote(tc.cache, list(l1))
        for i, key in enumerate(l1.values()):
            want = block_data(key)
            assert k[i].tobytes() == want[0].tobytes() and v[i].tobytes() == want[1].tobytes()
    for key, slot in tc.l2_keys.items():
        k, v = tc.host.load([slot])
        want = block_data(key)
        assert k[0].tobytes() == want[0].tobytes() and v[0].tobytes() == want[1].tobytes()
        # write-back: L1 and L2 exclusive; write-through: L2 may back up an L1 block
        assert tc.residency(key)[0] == L2 or tc.write_policy == "write_through"
        assert L2 in tc.residency(key)
    if tc.disk is not None:
        for key in tc.disk.stored_keys():
            got = tc.disk.get(key)
            if got is not None:  # a damaged entry is a miss, never wrong data
                want = block_data(key)
                assert got[0].tobytes() == want[0].tobytes()
                assert got[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_demote_spill_and_promote_back(tmp_path: Path, backend: str) -> None:
    tc = make(tmp_path, pages=4, slots=2, backend=backend)
    a = [1, 2, 3, 4, 5, 6, 7, 8]  # 4 blocks: fills L1
    assert write(tc, a)[0] == 0
    keys_a = tc.keys(a)
    assert tc.num_free_pages == 0 and all(tc.residency(k) == [L1] for k in keys_a)
    write(tc, [9, 9, 9, 9])  # evicts A's 2 tail blocks to L2
    assert [tc.residency(k) for k in keys_a] == [[L1], [L1], [L2], [L2]]
    verify(tc)
    write(tc, [7, 7, 7, 7])  # evicts 2 more (LRU: A's head) -> L2 full -> A's tail to L3
    assert tc.stats.spilled_to_l3 == 2
    verify(tc)
    m = tc.match(a)
    assert m.l1_tokens == 0 and m.length == 8
    assert [t for _, t in m.lower] == [L2, L2, L3, L3]
    length, _, pages = tc.promote(m)
    assert length == 8 and len(pages) == 4
    assert all(L1 in tc.residency(k) for k in keys_a)
    assert tc.stats.promoted == {L2: 2, L3: 2}
    verify(tc)
    k, _ = demote(tc.cache, pages)
    assert all(k[i].tobytes() == block_data(keys_a[i])[0].tobytes() for i in range(4))


def test_without_disk_blocks_are_dropped(tmp_path: Path) -> None:
    tc = make(None, pages=2, slots=1)
    write(tc, [1, 2, 3, 4])
    write(tc, [5, 6, 7, 8])  # A: tail -> L2 first, then head -> L2 spills tail (dropped)
    assert tc.stats.dropped == 1
    m = tc.match([1, 2, 3, 4])
    assert m.length == 2 and m.lower[0][1] == L2  # only the head survived, in L2
    verify(tc)
    assert tc.fetch([1, 2, 3, 4])[0] == 2
    verify(tc)


def test_locked_path_is_never_evicted(tmp_path: Path) -> None:
    tc = make(tmp_path, pages=3, slots=1)
    _, node = write(tc, [1, 1, 2, 2])
    tc.tree.lock(node)
    pages_before = tc.tree.path_blocks(node)
    _, node3 = write(tc, [3, 3])  # takes the last free page
    (page3,) = tc.tree.path_blocks(node3)
    with pytest.raises(OutOfBlocksError):
        tc.allocate_pages(3)  # would need the locked pages; nothing is evicted
    assert tc.tree.path_blocks(node) == pages_before and tc.num_free_pages == 0
    assert tc.allocate_pages(1) == [page3]  # only the unlocked block can go (to L2)
    assert tc.residency(tc.keys([3, 3])[0]) == [L2]
    assert tc.tree.path_blocks(node) == pages_before
    assert tc.evict(10) == []  # everything left is locked: terminates, frees nothing
    tc.free_pages([page3])
    tc.tree.unlock(node)
    verify(tc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_l3_entry_stops_promotion(tmp_path: Path, backend: str) -> None:
    tc = make(tmp_path, pages=3, slots=0, backend=backend)  # no L2: evictions go to disk
    a = [1, 2, 3, 4, 5, 6]
    write(tc, a)
    tc.evict(3)
    keys = tc.keys(a)
    assert all(tc.residency(k) == [L3] for k in keys)
    m = tc.match(a)
    assert m.length == 6
    path = tc.disk.path(keys[1]) if tc.disk is not None else None
    assert path is not None
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    length, _, _ = tc.promote(m)
    assert length == 2 and tc.stats.promote_misses == 1
    verify(tc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_reads_blocks_written_by_another_instance(tmp_path: Path, backend: str) -> None:
    a = [4, 3, 2, 1, 4, 3, 2, 1]
    first = make(tmp_path, pages=4, slots=0, ns="model-x", backend=backend)
    write(first, a)
    first.evict(4)
    second = make(tmp_path, pages=4, slots=2, ns="model-x", backend=backend)
    m = second.match(a)
    assert m.length == 8 and {t for _, t in m.lower} == {L3}
    assert second.promote(m)[0] == 8
    verify(second)
    other_model = make(tmp_path, pages=4, slots=2, ns="model-y", backend=backend)
    assert other_model.match(a).length == 0  # namespaces never share blocks


@given(st.integers(0, 2**32 - 1), DISKS, st.sampled_from(WRITE_POLICIES),
       st.sampled_from(STAGING))
@settings(max_examples=30, deadline=None)
def test_random_operations_never_lose_or_garble_blocks(tmp_path_factory: pytest.TempPathFactory,
                                                       seed: int, disk: str | None,
                                                       policy: str, staging: str) -> None:
    rng = np.random.default_rng(seed)
    with_disk = disk is not None
    tc = make(tmp_path_factory.mktemp("l3") if disk else None, pages=int(rng.integers(2, 7)),
              slots=int(rng.integers(0, 4)), policy=policy, backend=disk or DEFAULT_BACKEND,
              staging=staging)
    locked: list[tuple[RadixNode, list[int], list[str]]] = []
    jobs: list[Prefetch] = []
    known: set[str] = set()  # every block ever cached
    damaged: set[str] = set()
    for _ in range(30):
        op = rng.integers(0, 12)
        if op < 5:  # a request: tokens from a tiny vocabulary so prefixes are shared
            tokens = rng.integers(0, 3, int(rng.integers(1, 5)) * S).tolist()
            with contextlib.suppress(OutOfBlocksError):  # everything is locked
                write(tc, tokens)
                known.update(tc.keys(tokens))
        elif op < 7:  # lock what a match finds (a running request)
            tokens = rng.integers(0, 3, int(rng.integers(1, 5)) * S).tolist()
            length, node, pages = tc.fetch(tokens)
            if length:
                tc.tree.lock(node)
                locked.append((node, pages, tc.keys(tokens)[: len(pages)]))
        elif op < 8 and locked:
            node, _, _ = locked.pop(int(rng.integers(0, len(locked))))
            tc.tree.unlock(node)
        elif op < 9:
            tc.evict(int(rng.integers(0, 4)))
        elif op < 10:  # background L3 -> L2 read, published by a later op
            tokens = rng.integers(0, 3, int(rng.integers(1, 5)) * S).tolist()
            jobs.append(tc.prefetch(tokens, background=bool(rng.integers(0, 2))))
        elif op < 11 and jobs:
            tc.finish_prefetch(jobs.pop(int(rng.integers(0, len(jobs)))))
        elif tc.disk is not None and tc.disk.stored_keys():  # damage a disk entry
            keys = tc.disk.stored_keys()
            key = keys[int(rng.integers(0, len(keys)))]
            damaged.add(key)
            path = tc.disk.path(key)
            path.write_bytes(path.read_bytes()[:-1])
        verify(tc)
        if with_disk:  # with a disk nothing is ever lost, except behind a damaged file
            assert all(tc.residency(key) for key in known - damaged)
        for node, pages, keys in locked:  # locked blocks stay in L1, in place, untouched
            assert node.alive and tc.tree.path_blocks(node) == pages
            assert [tc.l1_pages[p] for p in pages] == keys
    for job in jobs:
        tc.finish_prefetch(job)
    for node, _, _ in locked:
        tc.tree.unlock(node)
    tc.evict(10**6)
    assert tc.num_free_pages == tc.cache.num_pages and tc.tree.total_blocks == 0
    verify(tc)


def test_promotion_survives_eviction_of_its_own_source() -> None:
    """Allocating pages for a promotion evicts L1 blocks into L2, which pushes out the very
    L2 entry being promoted; the promotion must still copy the right bytes."""
    tc = make(None, pages=2, slots=1)
    write(tc, [1, 1])
    write(tc, [2, 2])
    write(tc, [3, 3])  # A=[1, 1] -> L2
    key_a, key_b = tc.keys([1, 1])[0], tc.keys([2, 2])[0]
    m = tc.match([1, 1])
    assert m.lower == [(key_a, L2)]
    length, _, pages = tc.promote(m)  # evicts B -> L2 full -> A's L2 copy dropped
    assert length == 2 and tc.stats.dropped == 1
    assert tc.residency(key_a) == [L1] and tc.residency(key_b) == [L2]
    k, v = demote(tc.cache, pages)
    assert k[0].tobytes() == block_data(key_a)[0].tobytes()
    assert v[0].tobytes() == block_data(key_a)[1].tobytes()
    verify(tc)


def test_prefetch_slots_survive_evictions_while_in_flight(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tc = make(tmp_path, pages=2, slots=3)
    a = [5, 5, 6, 6]
    write(tc, a)
    tc.evict(2)  # A -> L2
    tc._spill_l2(2)  # and on to L3 only
    keys_a = tc.keys(a)
    assert all(tc.residency(k) == [L3] for k in keys_a)
    assert tc.disk is not None
    gate, started = threading.Event(), threading.Event()
    real_get = tc.disk.get

    def slow_get(key: str) -> tuple[np.ndarray, np.ndarray] | None:
        started.set()
        assert gate.wait(30)
        return real_get(key)

    monkeypatch.setattr(tc.disk, "get", slow_get)
    job = tc.prefetch(a)
    assert started.wait(30) and len(job.entries) == 2 and tc.host.num_free == 1
    reserved = {slot for _, slot in job.entries}
    # churn while the read is in flight: evictions fill L2 and force spills
    for toks in ([1, 1, 2, 2], [3, 3, 4, 4], [7, 7, 8, 8]):
        write(tc, toks)
        tc.check_invariants()
        assert set(tc.l2_keys.values()).isdisjoint(reserved)
    with pytest.raises(TimeoutError):
        tc.finish_prefetch(job, timeout=0.01)
    gate.set()
    assert tc.finish_prefetch(job) == 2
    monkeypatch.undo()
    assert all(tc.residency(k)[0] == L2 for k in keys_a)
    verify(tc)
    m = tc.match(a)
    assert [t for _, t in m.lower] == [L2, L2]
    length, _, pages = tc.promote(m)
    assert length == 4
    k, _ = demote(tc.cache, pages)
    assert [k[i].tobytes() for i in range(2)] == [block_data(x)[0].tobytes() for x in keys_a]
    verify(tc)


def test_prefetch_of_block_that_reached_l1_meanwhile_frees_its_slot(tmp_path: Path) -> None:
    tc = make(tmp_path, pages=2, slots=2)
    a = [5, 5]
    write(tc, a)
    tc.evict(1)
    tc._spill_l2(1)
    (key,) = tc.keys(a)
    job = tc.prefetch(a)
    job_done = job.thread is not None and job.thread.join(30)
    del job_done
    tc.fetch(a)  # promoted straight from L3 before the prefetch is published
    assert tc.finish_prefetch(job) == 0 and tc.residency(key)[:1] == [L1]
    assert tc.host.num_free == 2
    verify(tc)
    # a corrupt entry: the prefetch publishes nothing and returns its slot
    tc.evict(1)
    tc._spill_l2(1)
    path = tc.disk.path(key) if tc.disk is not None else None
    assert path is not None
    path.write_bytes(path.read_bytes()[:-4])
    assert tc.finish_prefetch(tc.prefetch(a, background=False)) == 0
    assert tc.host.num_free == 2 and tc.residency(key) == []  # the damaged file is gone
    verify(tc)


def test_write_through_copies_at_insert_and_evicts_without_copying(tmp_path: Path) -> None:
    tc = make(tmp_path, pages=3, slots=4, policy="write_through")
    a = [1, 2, 3, 4, 5, 6]
    write(tc, a)
    keys = tc.keys(a)
    assert [tc.residency(k) for k in keys] == [[L1, L2]] * 3  # backed up at insert
    copied = tc.host.stats.bytes_to_host
    assert copied == 3 * tc.host.slot_bytes and tc.stats.demoted_to_l2 == 3
    verify(tc)
    tc.evict(3)  # the L2 copies become the only ones: nothing moves
    assert tc.host.stats.bytes_to_host == copied and tc.stats.demoted_to_l2 == 3
    assert [tc.residency(k) for k in keys] == [[L2]] * 3
    write(tc, [7, 7, 8, 8])  # 2 more backups: L2 (4 slots) spills A's LRU block to disk
    assert tc.stats.spilled_to_l3 == 1 and sum(L3 in tc.residency(k) for k in keys) == 1
    verify(tc)
    length, _, pages = tc.fetch(a)
    assert length == 6
    k, _ = demote(tc.cache, pages)
    assert [k[i].tobytes() for i in range(3)] == [block_data(x)[0].tobytes() for x in keys]
    verify(tc)


def _compute(tc: TieredPrefixCache, tokens: list[int], pages: list[int], start: int) -> None:
    """Write the K/V of ``tokens``' full blocks ``start ..`` into ``pages`` (a request's work)."""
    keys = tc.keys(tokens)[start:]
    if keys:
        data = [block_data(key) for key in keys]
        tc.cache = promote(tc.cache, pages[start : start + len(keys)],
                           np.stack([d[0] for d in data]), np.stack([d[1] for d in data]))


@given(st.integers(0, 2**32 - 1), st.sampled_from(PREFETCH_POLICIES),
       st.sampled_from(WRITE_POLICIES), DISKS)
@settings(max_examples=20, deadline=None)
def test_random_requests_keep_tables_and_tiers_consistent(
        tmp_path_factory: pytest.TempPathFactory, seed: int, prefetch: str, write: str,
        disk: str | None) -> None:
    """Requests (lookup, decode + commit, release) interleaved with evictions and prefetches
    over a small pool: every live request's table keeps the right data in place (its
    locked blocks are never evicted), all pages are accounted for, and with a disk no
    cached block is ever lost."""
    rng = np.random.default_rng(seed)
    with_disk = disk is not None
    tc = make(tmp_path_factory.mktemp("l3") if disk else None, pages=int(rng.integers(4, 9)),
              slots=int(rng.integers(0, 4)), policy=write, backend=disk or DEFAULT_BACKEND)
    reqs = TieredRequests(tc, TierConfig(prefetch=prefetch, prefetch_timeout_s=0.001,
                                         write_policy=write))
    live: dict[int, list[int]] = {}  # request -> tokens committed so far
    known: set[str] = set()
    next_id = 0
    for _ in range(40):
        op = rng.integers(0, 10)
        if op < 4:  # a new request, its prompt's reads maybe prefetched first
            tokens = rng.integers(0, 3, int(rng.integers(1, 5)) * S + int(rng.integers(0, S)))
            if rng.integers(0, 2):
                reqs.prefetch(tokens)
            try:
                reused, suffix = reqs.lookup(next_id, tokens, int(rng.integers(0, 2 * S)))
            except OutOfBlocksError:
                continue
            assert len(reused) * S + len(suffix) == len(tokens) and len(suffix) > 0
            table = reqs.block_table(next_id)
            assert table[: len(reused)] == reused
            _compute(tc, tokens.tolist(), table, len(reused))
            reqs.commit(next_id, tokens)
            live[next_id] = tokens.tolist()
            next_id += 1
        elif op < 6 and live:  # decode: new tokens up to the reserved slots, committed
            rid = list(live)[int(rng.integers(0, len(live)))]
            room = len(reqs.block_table(rid)) * S - len(live[rid])
            grown = live[rid] + rng.integers(0, 3, int(rng.integers(0, room + 1))).tolist()
            _compute(tc, grown, reqs.block_table(rid), len(live[rid]) // S)
            reqs.commit(rid, grown)
            live[rid] = grown
        elif op < 8 and live:
            rid = list(live)[int(rng.integers(0, len(live)))]
            known.update(tc.keys(live.pop(rid)))
            reqs.release(rid)
        elif op < 9:
            reqs.evict(int(rng.integers(0, 4)))
        else:
            reqs.prefetch(rng.integers(0, 3, int(rng.integers(1, 5)) * S))
        reqs.check_invariants()
        verify(tc)
        for rid, tokens in live.items():  # committed blocks: locked, in place, intact
            keys = tc.keys(tokens)
            pages = reqs.block_table(rid)[: len(keys)]
            assert [tc.l1_pages.get(p) for p in pages] == keys
            if keys:
                k, _ = demote(tc.cache, pages)
                assert [k[i].tobytes() for i in range(len(keys))] == [
                    block_data(key)[0].tobytes() for key in keys]
        if with_disk:
            assert all(tc.residency(key) for key in known)
    reqs.drain()
    for rid in list(live):
        reqs.release(rid)
    reqs.check_invariants()
    assert tc.num_free_pages + tc.tree.total_blocks == tc.num_pages
