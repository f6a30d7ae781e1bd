"""A HiCache-like three-tier prefix cache: device pages (L1), host slots (L2), disk (L3).

The L1 index is a :class:`~kvjax.memory.radix.RadixTree` over the device
pages of a :class:`~kvjax.cache.paged.PagedCache`.  Every cached block has a
chained key (:func:`kvjax.memory.block_hash.chain_keys`) naming its whole
prefix, and lives in:

* L1: a device page owned by the tree (``page -> key`` recorded at insert);
* L2: a :class:`~kvjax.memory.host_pool.HostPool` slot (``key -> slot``, LRU);
* L3: a :class:`~kvjax.memory.disk_store.DiskStore` entry (file per key).

L3 is a persistent backing store that may also hold blocks of L1/L2.  Whether L2
may hold copies of L1 blocks is the write policy (``WRITE_POLICIES``):

* ``write_back``: L1 and L2 are exclusive (a block is in at most one of them);
  a block is copied down only when the tree evicts it;
* ``write_through``: a block entering L1 is copied to an L2 slot at once (as L2
  room allows, spilling LRU entries), so evicting it later copies nothing; L2
  keeps that copy while the block is in L1, and an L2 copy of an L1 block that
  L2 spills is simply freed.

Data moves:

* L1 -> L2: when the tree evicts blocks, the pages without an L2 copy are
  copied to host slots *before* the pages return to the free list;
* L2 -> L3: when L2 needs slots, its least recently used entries are written to
  disk (or dropped when there is no enabled disk store);
* L3/L2 -> L1: ``promote`` copies the blocks a ``match`` found below L1 up into
  fresh device pages and re-inserts them into the tree.  The data is read into
  private host arrays *before* any device page is allocated, so evictions
  triggered by that allocation cannot reclaim it mid-copy.

The tree manages device pages ``0 .. num_pages - 1`` (default: all of them); a
larger device array may hold pages the cache never touches.

Copy timing: every device <-> host copy is timed (blocking until it is done)
into ``host.stats``; disk reads and writes are timed by the store.

Threads: the cache's methods must be called from one thread.  The only
background work is ``prefetch``: a ``threading.Thread`` reads L3 entries into
host slots reserved up front.  Reserved slots are not L2 entries until
``finish_prefetch`` (on the caller's thread) publishes them, so no eviction or
spill can reclaim a slot while a read into it is in flight.  Device
pages are owned by this object: ``allocate_pages`` hands out free pages
(evicting LRU tree leaves when needed), and ``insert`` takes them back,
keeping those the tree adopts and freeing the others.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvjax.cache.paged import PagedCache
from kvjax.memory.allocator import OutOfBlocksError
from kvjax.memory.block_hash import chain_keys
from kvjax.memory.disk_store import DiskStore
from kvjax.memory.host_pool import Block, HostPool
from kvjax.memory.radix import RadixNode, RadixTree, as_token_array

L1, L2, L3 = "L1", "L2", "L3"
WRITE_POLICIES = ("write_back", "write_through")


@dataclass(frozen=True)
class TierMatch:
    """Result of :meth:`TieredPrefixCache.match`.

    ``node``/``l1_pages`` end the L1 part (``l1_tokens`` tokens); ``lower``
    lists ``(key, tier)`` of the following blocks found in L2 or L3, in order.
    """

    tokens: np.ndarray  # the query tokens
    node: RadixNode
    l1_tokens: int
    l1_pages: list[int]
    lower: list[tuple[str, str]]
    block_size: int

    @property
    def length(self) -> int:
        """Tokens available in some tier (block aligned)."""
        return self.l1_tokens + len(self.lower) * self.block_size


@dataclass
class TierStats:
    lookups: int = 0
    evictions: int = 0  # L1 eviction rounds
    evicted_blocks: int = 0  # blocks that left L1 (to L2, to L3 or dropped)
    hit_tokens: dict[str, int] = field(default_factory=lambda: {L1: 0, L2: 0, L3: 0})
    demoted_to_l2: int = 0  # blocks copied L1 -> L2 (on eviction, or at insert: write-through)
    spilled_to_l3: int = 0  # blocks written to L3 on leaving L2 (or L1 when L2 had no room)
    dropped: int = 0  # blocks that left L1/L2 with no lower tier to take them
    promoted: dict[str, int] = field(default_factory=lambda: {L2: 0, L3: 0})
    promote_misses: int = 0  # L3 entries that failed to read at promote time
    persisted: int = 0  # L1/L2 blocks written to L3 by ``persist`` (they stay where they are)
    prefetched: int = 0  # blocks read L3 -> L2 by finished prefetches
    prefetch_read_s: float = 0.0  # seconds those reads took (in the background thread)


class Prefetch:
    """An in-flight L3 -> L2 read started by :meth:`TieredPrefixCache.prefetch`."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:
        self.entries = entries  # (key, reserved host slot), in prefix order
        self.loaded: dict[str, bool] = {}  # written by the worker thread only
        self.read_s = 0.0  # the worker's reading time (written by the worker thread only)
        self.thread: threading.Thread | None = None
        self.finished = False

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class TieredPrefixCache:
    """Prefix cache over device pages with host and disk tiers below it."""

    def __init__(self, cache: PagedCache, host: HostPool, disk: DiskStore | None = None, *,
                 namespace: str, vocab_size: int | None = None,
                 num_pages: int | None = None, write_policy: str = "write_back") -> None:
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got "
                             f"{write_policy!r}")
        num_pages = cache.num_pages if num_pages is None else num_pages
        if isinstance(num_pages, bool) or not 1 <= num_pages <= cache.num_pages:
            raise ValueError(f"num_pages must be in [1, {cache.num_pages}], got {num_pages!r}")
        if host.slot_shape != (cache.k_pages.shape[0], *cache.k_pages.shape[2:]):
            raise ValueError(f"host slots {host.slot_shape} do not match the device pages")
        if host.dtype != cache.k_pages.dtype:
            raise ValueError(f"host dtype {host.dtype} != page dtype {cache.k_pages.dtype}")
        self.cache = cache
        self.host = host
        self.disk = disk
        self.namespace = namespace
        self.block_size = cache.page_size
        self.num_pages = int(num_pages)
        self.write_policy = write_policy
        self.tree = RadixTree(self.block_size, vocab_size=vocab_size, on_evict=self._on_evict)
        self._free: deque[int] = deque(range(self.num_pages))
        self._page_key: dict[int, str] = {}  # tree-owned page -> key
        self._l2: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recent first
        self._inflight: dict[str, int] = {}  # key -> slot reserved by a running prefetch
        self.stats = TierStats()

    # ------------------------------------------------------------------ residency
    def keys(self, token_ids: Any) -> list[str]:
        return chain_keys(self.namespace, as_token_array(token_ids, self.tree.vocab_size),
                          self.block_size)

    def residency(self, key: str) -> list[str]:
        """Tiers holding ``key`` (L3 by file presence)."""
        out = [L1] if key in self._page_key.values() else []
        if key in self._l2:
            out.append(L2)
        if self._disk_on and self.disk is not None and self.disk.contains(key):
            out.append(L3)
        return out

    @property
    def _disk_on(self) -> bool:
        return self.disk is not None and self.disk.enabled

    @property
    def l2_keys(self) -> dict[str, int]:
        """``key -> host slot`` of the L2 entries (a copy, least recent first)."""
        return dict(self._l2)

    @property
    def l1_pages(self) -> dict[int, str]:
        """``page -> key`` of the tree-owned device pages (a copy)."""
        return dict(self._page_key)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    # ------------------------------------------------------------------ copies
    def _to_host(self, pages: list[int]) -> list[Block]:
        """Timed device -> host copy of ``pages``: one ``(k, v)`` block per page."""
        return self.host.copy_out(self.cache, pages)

    def _to_device(self, pages: list[int], blocks: list[Block]) -> None:
        """Timed host -> device copy into ``pages`` (blocks until written; donates the pool)."""
        self.cache = self.host.copy_in(self.cache, pages, blocks)

    # ------------------------------------------------------------------ eviction
    def _to_l3(self, keys: Sequence[str], blocks: Sequence[Block]) -> None:
        for key, (k, v) in zip(keys, blocks, strict=True):
            if self._disk_on and self.disk is not None:
                self.disk.put(key, np.asarray(k), np.asarray(v))
                if self.disk.enabled:
                    self.stats.spilled_to_l3 += 1
                    continue
            self.stats.dropped += 1

    def _spill_l2(self, n: int) -> None:
        """Free ``n`` L2 slots, least recently used entries first, writing them to L3."""
        victims: list[tuple[str, int]] = []
        while len(victims) < n and self._l2:
            victims.append(self._l2.popitem(last=False))
        if not victims:
            return
        in_l1 = set(self._page_key.values())  # write-through copies: nothing is lost
        self.host.free([slot for key, slot in victims if key in in_l1])
        victims = [(key, slot) for key, slot in victims if key not in in_l1]
        keys, slots = [key for key, _ in victims], [slot for _, slot in victims]
        blocks = self.host.take(slots)
        self.host.free(slots)
        self._to_l3(keys, blocks)

    def _into_l2(self, keys: list[str], blocks: list[Block]) -> None:
        """Store blocks as L2 entries (most recent last), spilling LRU entries to make room.

        At most ``num_slots`` minus the slots reserved by prefetches.
        """
        self._spill_l2(len(keys) - self.host.num_free)
        slots = self.host.allocate(len(keys))
        self.host.put(slots, blocks)
        for key, slot in zip(keys, slots, strict=True):
            self._l2[key] = slot
        self.stats.demoted_to_l2 += len(keys)

    def _on_evict(self, pages: list[int]) -> None:
        """Tree eviction: write the pages' data back to L2 (spilling L2 to L3), free them."""
        keys = [self._page_key.pop(p) for p in pages]
        self.stats.evictions += 1
        self.stats.evicted_blocks += len(pages)
        for key in keys:  # L2 copies made at insert (write-through): now the only copy
            if key in self._l2:
                self._l2.move_to_end(key)
        copy = [i for i, key in enumerate(keys) if key not in self._l2]
        if copy:
            keys = [keys[i] for i in copy]
            blocks = self._to_host([pages[i] for i in copy])
            # Pages come tail first.  If L2 cannot take them all it keeps the last ones
            # (nearest the root: a tail block is unreachable without its prefix), and
            # they enter L2's LRU order after the tails, which therefore spill first.
            fit = min(len(keys), self.host.num_slots - len(self._inflight))  # not reserved
            cut = len(keys) - fit
            self._to_l3(keys[:cut], blocks[:cut])
            self._into_l2(keys[cut:], blocks[cut:])
        self._free.extend(pages)

    def allocate_pages(self, n: int) -> list[int]:
        """``n`` free device pages, evicting unlocked tree blocks (to L2) if needed.

        Raises ``OutOfBlocksError`` before evicting anything if even evicting
        every unlocked block could not free enough.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free) + self.tree.evictable_blocks:
            raise OutOfBlocksError(n, len(self._free))
        while len(self._free) < n:
            if not self.tree.evict(n - len(self._free)):  # cannot loop without progress
                raise OutOfBlocksError(n, len(self._free))
        return [self._free.popleft() for _ in range(n)]

    def free_pages(self, pages: Sequence[int]) -> None:
        """Return pages from ``allocate_pages`` that were not handed to ``insert``."""
        ids = [int(p) for p in pages]
        if len(set(ids)) != len(ids) or any(
                p in self._page_key or p in self._free or not 0 <= p < self.num_pages
                for p in ids):
            raise ValueError(f"pages {ids} are not all allocated and outside the tree")
        self._free.extend(ids)

    def evict(self, num_blocks: int) -> list[int]:
        """Evict up to ``num_blocks`` unlocked L1 blocks (demoting them); the freed pages."""
        return self.tree.evict(num_blocks)

    def persist(self) -> int:
        """Write every L1 and L2 block that L3 lacks to L3 (e.g. before exiting).

        Blocks stay where they are; returns how many entries were written.
        """
        if not self._disk_on or self.disk is None:
            return 0
        disk = self.disk
        l1 = [(page, key) for page, key in self._page_key.items() if not disk.contains(key)]
        l2 = [(key, slot) for key, slot in self._l2.items() if not disk.contains(key)]
        written = 0
        for keys, blocks in (([key for _, key in l1], self._to_host([p for p, _ in l1])),
                             ([key for key, _ in l2], self.host.take([s for _, s in l2]))):
            written += sum(disk.put(key, np.asarray(k), np.asarray(v))
                           for key, (k, v) in zip(keys, blocks, strict=True))
        self.stats.persisted += written
        return written

    # ------------------------------------------------------------------ insert / match
    def insert(self, token_ids: Any, pages: Sequence[int], cache: PagedCache | None = None
               ) -> int:
        """Cache the full blocks of ``token_ids`` whose K/V are in ``pages`` of ``cache``.

        ``pages`` (one per full block, from ``allocate_pages`` or the tree's own
        pages for an already cached prefix) are handed over: the tree adopts
        those of newly cached blocks, the other freshly allocated ones are freed.
        ``cache`` (if given) becomes the current device cache.  Returns the
        number of newly cached tokens.
        """
        if cache is not None:
            self.cache = cache
        q = as_token_array(token_ids, self.tree.vocab_size)
        bs = self.block_size
        pages = [int(p) for p in pages]
        keys = chain_keys(self.namespace, q, bs)
        cached = self.tree.peek_prefix(q)
        new = self.tree.insert(q, pages)
        lo, hi = cached // bs, (cached + new) // bs
        for i in range(lo, hi):
            self._page_key[pages[i]] = keys[i]
            if self.write_policy == "write_back":  # keep L1 and L2 exclusive
                slot = self._l2.pop(keys[i], None)
                if slot is not None:
                    self.host.free([slot])
        leftover = [p for i, p in enumerate(pages) if not lo <= i < hi
                    and p not in self._page_key and p not in self._free]
        self._free.extend(leftover)
        if self.write_policy == "write_through":
            copy = [i for i in range(lo, hi) if keys[i] not in self._l2]
            copy = copy[: self.host.num_slots - len(self._inflight)]  # prefix first
            if copy:
                self._into_l2([keys[i] for i in copy], self._to_host([pages[i] for i in copy]))
        return new

    def find(self, token_ids: Any) -> TierMatch:
        """Longest block-aligned prefix held in any tier: L1 tree, then L2, then L3.

        Touches the LRU order of the L1 path and of the L2 entries found; counts nothing.
        """
        q = as_token_array(token_ids, self.tree.vocab_size)
        bs = self.block_size
        l1, node, pages = self.tree.match_prefix(q)
        keys = chain_keys(self.namespace, q, bs)
        lower: list[tuple[str, str]] = []
        for key in keys[l1 // bs :]:
            if key in self._l2:
                self._l2.move_to_end(key)
                lower.append((key, L2))
            elif self._disk_on and self.disk is not None and self.disk.contains(key):
                lower.append((key, L3))
            else:
                break
        return TierMatch(q, node, l1, pages, lower, bs)

    def match(self, token_ids: Any) -> TierMatch:
        """``find``, counted in ``stats`` as a lookup with its per-tier hits."""
        m = self.find(token_ids)
        self.stats.lookups += 1
        self.stats.hit_tokens[L1] += m.l1_tokens
        for _, tier in m.lower:
            self.stats.hit_tokens[tier] += self.block_size
        return m

    def promote(self, match: TierMatch) -> tuple[int, RadixNode, list[int]]:
        """Bring ``match``'s L2/L3 blocks into L1; ``(length, node, pages)`` like ``match_prefix``.

        Stops early at an L3 entry that fails to read (corrupt / deleted) or
        when device pages run out (locked blocks); the result says how far L1
        now reaches.  ``match`` must come from this cache with no other call in
        between, except ones that leave ``match.node`` alive.
        """
        node = match.node
        self.tree.lock(node)  # ValueError if evicted since the match
        try:
            blocks: list[Block] = []
            keys = []
            for key, tier in match.lower:
                if tier == L2 and key in self._l2:
                    blocks += self.host.take([self._l2[key]])
                else:
                    got = self.disk.get(key) if self.disk is not None else None
                    if got is None:
                        self.stats.promote_misses += 1
                        break
                    blocks.append((got[0], got[1]))
                keys.append(key)
            n = min(len(keys), len(self._free) + self.tree.evictable_blocks)
            for _, tier in match.lower[:n]:
                self.stats.promoted[tier] += 1
            if n == 0:
                return match.l1_tokens, node, list(match.l1_pages)
            # Data is in private arrays now: evictions below cannot take it away.
            new_pages = self.allocate_pages(n)
            self._to_device(new_pages, blocks[:n])
            end = match.l1_tokens + n * self.block_size
            self.insert(match.tokens[:end], self.tree.path_blocks(node) + new_pages)
        finally:
            self.tree.unlock(node)
        return self.tree.match_prefix(match.tokens[:end])

    def fetch(self, token_ids: Any) -> tuple[int, RadixNode, list[int]]:
        """``promote(match(token_ids))``: the longest prefix, all of it in L1."""
        return self.promote(self.match(token_ids))

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, token_ids: Any, *, background: bool = True) -> Prefetch:
        """Start reading the L3-only blocks of ``token_ids``' cached prefix into L2.

        Host slots are reserved now (spilling LRU L2 entries if needed); at most
        ``num_slots`` blocks, prefix first.  The read runs in a thread (or
        inline without ``background``); call ``finish_prefetch`` to publish it.
        """
        m = self.find(token_ids)
        want: list[str] = []
        for key, tier in m.lower:
            if tier == L3 and key not in self._inflight:
                want.append(key)
        want = want[: self.host.num_slots - len(self._inflight)]
        self._spill_l2(len(want) - self.host.num_free)
        want = want[: self.host.num_free]
        slots = self.host.allocate(len(want))
        job = Prefetch(list(zip(want, slots, strict=True)))
        self._inflight.update(job.entries)
        if background and job.entries:
            job.thread = threading.Thread(target=self._prefetch_worker, args=(job,),
                                          daemon=True, name="kvjax-l3-prefetch")
            job.thread.start()
        else:
            self._prefetch_worker(job)
        return job

    def _prefetch_worker(self, job: Prefetch) -> None:
        """Runs off the caller's thread: touches only the job and its reserved slots."""
        t0 = time.perf_counter()
        for key, slot in job.entries:
            got = self.disk.get(key) if self.disk is not None else None
            if got is not None:
                self.host.put([slot], [(got[0], got[1])])
            job.loaded[key] = got is not None
        job.read_s = time.perf_counter() - t0

    def finish_prefetch(self, job: Prefetch, timeout: float | None = None) -> int:
        """Wait for ``job`` and publish its blocks as L2 entries; return how many.

        A block that failed to read, or that reached L1/L2 another way meanwhile,
        gives its slot back.  Raises ``TimeoutError`` (publishing nothing) if the
        read is still running after ``timeout`` seconds.
        """
        if job.finished:
            return 0
        if job.thread is not None:
            job.thread.join(timeout)
            if job.thread.is_alive():
                raise TimeoutError("prefetch still running")
        l1_keys = set(self._page_key.values())
        published = 0
        for key, slot in job.entries:
            del self._inflight[key]
            if job.loaded.get(key) and key not in l1_keys and key not in self._l2:
                self._l2[key] = slot
                published += 1
            else:
                self.host.free([slot])
        job.finished = True
        self.stats.prefetched += published
        self.stats.prefetch_read_s += job.read_s
        return published

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Recount residency metadata against the tree and the pools."""

        def fail(msg: str) -> None:
            raise AssertionError(f"tiered cache invariant violated: {msg}")

        self.tree.check_invariants()
        tree_pages = {b for n in self.tree.nodes() for b in n.blocks}
        if tree_pages != set(self._page_key):
            fail("page->key map differs from the tree's pages")
        free = list(self._free)
        if len(set(free)) != len(free) or tree_pages & set(free):
            fail("free list has duplicates or tree pages")
        if len(set(self._page_key.values())) != len(self._page_key):
            fail("a key is in two device pages")
        l1_keys = set(self._page_key.values())
        if self.write_policy == "write_back" and l1_keys & set(self._l2):
            fail("a block is in both L1 and L2")
        for node in self.tree.nodes():
            keys = self.keys(self.tree.path_tokens(node))
            for page, key in zip(node.blocks, keys[-len(node.blocks):], strict=True):
                if self._page_key[page] != key:
                    fail(f"page {page} of {node!r} recorded under the wrong key")
        slots = list(self._l2.values()) + list(self._inflight.values())
        if len(set(slots)) != len(slots) or any(not self.host.is_allocated(s) for s in slots):
            fail("L2 / in-flight slots duplicated or not allocated")
        if len(slots) + self.host.num_free != self.host.num_slots:
            fail("host slots leaked")
