"""Requests over a :class:`~kvjax.memory.hicache.TieredPrefixCache`: lookup, commit, release.

``TieredRequests`` offers the request interface of
:class:`~kvjax.memory.prefix_cache.PrefixCache` (what
:class:`~kvjax.engine.prefix_generate.PrefixCachedGenerator` drives) on top of
the three tiers:

* ``prefetch`` (when a request is queued, ahead of its lookup) starts a
  background L3 -> L2 read of the blocks of its prefix found only on disk;
* ``lookup`` settles that read as the prefetch policy says, finds the longest
  cached prefix in any tier, promotes its L2/L3 part into fresh device pages
  (L1), locks it, and allocates private pages for the rest of the prompt and
  the decode budget.  Allocation evicts least recently used unlocked L1 blocks,
  which the tiered cache demotes to L2 (and L2 spills to L3);
* ``commit`` hands the request's computed full blocks to the tree; where the
  tree already holds a block, the request's duplicate page is freed and its
  table points at the tree's page instead;
* ``release`` unlocks the request's prefix and frees its private pages.

Page ownership.  A device page is free, owned by the tree, or private to one
request.  A request's table is its locked tree path followed by its private
pages; the split is at ``len(prefix) // block_size``.

Prefetch policies (``PREFETCH_POLICIES``), applied at lookup:

* ``off``: no background reads; L2 and L3 blocks are promoted at lookup, the
  L3 reads on the request's critical path;
* ``wait_complete``: wait for the request's running prefetch reads, then
  promote everything found (an L3 block no prefetch covered is read then);
* ``timeout``: wait at most ``prefetch_timeout_s`` for them, then promote the
  L1/L2 part; L3 blocks not yet in L2 are recomputed;
* ``best_effort``: never wait; promote what L2 holds now, recompute the rest.

A read that was not waited for still lands in L2 when it finishes (``drain``
publishes every read still running).  Timing: ``prefetch_wait_s`` is the time a
lookup blocked on prefetch reads; ``prefetch_hidden_s`` sums, over finished
reads, the read time not waited for (it overlapped other work).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from kvjax.cache.paged import PagedCache
from kvjax.memory.allocator import DuplicateSequenceError, OutOfBlocksError, UnknownSequenceError
from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.disk_store import DEFAULT_BACKEND, DiskStore
from kvjax.memory.hicache import (
    L1,
    L2,
    L3,
    WRITE_POLICIES,
    Prefetch,
    TieredPrefixCache,
    TierMatch,
)
from kvjax.memory.host_pool import STAGING, HostPool
from kvjax.memory.prefix_cache import PrefixCacheStats
from kvjax.memory.radix import RadixNode, as_token_array

PREFETCH_POLICIES = ("off", "best_effort", "wait_complete", "timeout")


@dataclasses.dataclass(frozen=True)
class TierConfig:
    """The tiers below a generator's device pool (L1) and how requests use them."""

    host_blocks: int = 0  # L2: host slots of one block (all layers, K and V); 0 = no L2
    host_staging: str = "pageable"  # L1 <-> L2 copies: one of host_pool.STAGING
    disk_dir: str | None = None  # L3: directory of block files; None = no L3
    disk_backend: str = DEFAULT_BACKEND  # L3 file I/O: one of blob_store.BACKENDS
    namespace: str = "kvjax"  # names the model weights in L3 keys (never share across models)
    write_policy: str = "write_back"  # L1 -> L2: one of hicache.WRITE_POLICIES
    prefetch: str = "wait_complete"  # one of PREFETCH_POLICIES
    prefetch_timeout_s: float = 0.05  # the ``timeout`` policy's wait per lookup
    prefetch_depth: int = 4  # queued requests whose L3 blocks are read ahead of their lookup

    def __post_init__(self) -> None:
        if isinstance(self.host_blocks, bool) or not isinstance(self.host_blocks, int) or (
                self.host_blocks < 0):
            raise ValueError(f"host_blocks must be an int >= 0, got {self.host_blocks!r}")
        if self.host_staging not in STAGING:
            raise ValueError(f"host_staging must be one of {STAGING}, got "
                             f"{self.host_staging!r}")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got "
                             f"{self.write_policy!r}")
        if self.disk_backend not in BACKENDS:
            raise ValueError(f"disk_backend must be one of {BACKENDS}, got "
                             f"{self.disk_backend!r}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise ValueError(f"prefetch must be one of {PREFETCH_POLICIES}, got "
                             f"{self.prefetch!r}")
        if self.prefetch_timeout_s < 0 or self.prefetch_depth < 0:
            raise ValueError("prefetch_timeout_s and prefetch_depth must be >= 0")
        if not self.namespace:
            raise ValueError("namespace must not be empty")


@dataclasses.dataclass(frozen=True)
class RequestTiers:
    """Where one request's cached prefix came from, and what fetching it cost."""

    l1_tokens: int  # found in device pages
    l2_tokens: int  # promoted from host slots
    l3_tokens: int  # promoted from disk
    promote_s: float  # host -> device copies and synchronous disk reads at lookup
    prefetch_wait_s: float  # blocked on this request's prefetch reads at lookup


@dataclasses.dataclass
class _Request:
    node: RadixNode  # locked; ends the request's cached prefix
    prefix: np.ndarray  # token ids of that prefix: the table's first len // block_size pages
    table: list[int]  # tree path pages, then private pages
    tiers: RequestTiers


@dataclasses.dataclass
class _Counters:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: dict[str, int] = dataclasses.field(
        default_factory=lambda: {L1: 0, L2: 0, L3: 0})
    prefill_tokens_saved: int = 0
    promote_s: float = 0.0
    prefetch_wait_s: float = 0.0
    prefetch_hidden_s: float = 0.0
    prefetches: int = 0  # prefetch reads started (with at least one block)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


class TieredRequests:
    """Prefix-cached requests over device pages with host and disk tiers below them.

    See the module docstring.  Methods must be called from one thread.
    """

    def __init__(self, tiers: TieredPrefixCache, config: TierConfig) -> None:
        self.tiers = tiers
        self.config = config
        self.block_size = tiers.block_size
        self._requests: dict[int, _Request] = {}
        self._jobs: list[Prefetch] = []
        self._counters = _Counters()

    @classmethod
    def build(cls, pool: PagedCache, config: TierConfig, *, num_pages: int, namespace: str,
              vocab_size: int | None = None) -> TieredRequests:
        """Tiers under ``pool`` (its first ``num_pages`` pages are L1) as ``config`` says.

        ``namespace`` keys the L3 entries (``config.namespace`` plus the model's identity).
        """
        host = HostPool.like(pool, config.host_blocks, staging=config.host_staging)
        disk = (DiskStore(config.disk_dir, config.disk_backend)
                if config.disk_dir is not None else None)
        return cls(TieredPrefixCache(pool, host, disk, namespace=namespace,
                                     vocab_size=vocab_size, num_pages=num_pages,
                                     write_policy=config.write_policy), config)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, token_ids: Any) -> int:
        """Start reading the disk-only blocks of a queued request's prefix into L2.

        Returns how many blocks are being read (0 with the ``off`` policy or no L3).
        """
        if self.config.prefetch == "off" or self.tiers.disk is None:
            return 0
        job = self.tiers.prefetch(token_ids)
        if not job.entries:
            self.tiers.finish_prefetch(job)
            return 0
        self._jobs.append(job)
        self._counters.prefetches += 1
        return len(job.entries)

    def _finish(self, job: Prefetch, timeout: float | None) -> float:
        """Wait for ``job`` (at most ``timeout`` s) and publish it; the seconds waited."""
        t0 = time.perf_counter()
        try:
            self.tiers.finish_prefetch(job, timeout)
        except TimeoutError:
            return time.perf_counter() - t0
        waited = time.perf_counter() - t0
        self._jobs.remove(job)
        self._counters.prefetch_hidden_s += max(0.0, job.read_s - waited)
        return waited

    def _settle(self, keys: set[str]) -> float:
        """Publish finished reads; wait for the reads of ``keys`` as the policy says.

        Returns the seconds spent waiting on reads still running.
        """
        policy = self.config.prefetch
        deadline = time.perf_counter() + self.config.prefetch_timeout_s
        waited = 0.0
        for job in list(self._jobs):
            mine = any(key in keys for key, _ in job.entries)
            if job.done():
                self._finish(job, None)
            elif mine and policy == "wait_complete":
                waited += self._finish(job, None)
            elif mine and policy == "timeout":
                waited += self._finish(job, max(0.0, deadline - time.perf_counter()))
        return waited

    def drain(self) -> None:
        """Wait for every running prefetch read and publish it (nothing runs afterwards)."""
        for job in list(self._jobs):
            self._finish(job, None)

    # ------------------------------------------------------------------ requests
    def _request(self, request_id: int) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownSequenceError(request_id) from None

    def _usable(self, m: TierMatch) -> TierMatch:
        """``m`` cut to what the policy promotes: no disk reads at lookup unless it waits."""
        if self.config.prefetch in ("best_effort", "timeout"):
            tiers = [tier for _, tier in m.lower]
            if L3 in tiers:
                return dataclasses.replace(m, lower=m.lower[: tiers.index(L3)])
        return m

    def lookup(self, request_id: int, token_ids: Any,
               reserve_tokens: int = 0) -> tuple[list[int], np.ndarray]:
        """Start ``request_id``: bring its cached prefix into L1, lock it, reserve the rest.

        Returns ``(reused_pages, suffix_to_compute)`` like ``PrefixCache.lookup``: the
        request holds pages for ``len(token_ids) + reserve_tokens`` tokens and at least
        one token is left to compute.  Raises ``OutOfBlocksError`` before promoting or
        evicting anything if the request cannot fit next to the locked blocks.
        """
        q = as_token_array(token_ids, self.tiers.tree.vocab_size)
        if isinstance(reserve_tokens, bool) or not isinstance(reserve_tokens, int | np.integer):
            raise ValueError(f"reserve_tokens must be an int, got {reserve_tokens!r}")
        if reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {reserve_tokens}")
        if request_id in self._requests:
            raise DuplicateSequenceError(request_id)
        bs, tree = self.block_size, self.tiers.tree
        waited = self._settle(set(self.tiers.keys(q)))
        m = self._usable(self.tiers.match(q))
        total = -(-(len(q) + int(reserve_tokens)) // bs)
        # Promoted + private pages: total - L1 blocks (a full hit's last block is
        # recomputed, and may itself be evicted to make room for that copy).
        tree.lock(m.node)
        try:
            if total - len(m.l1_pages) > self.tiers.num_free_pages + tree.evictable_blocks:
                raise OutOfBlocksError(total - len(m.l1_pages), self.tiers.num_free_pages)
        finally:
            tree.unlock(m.node)
        t0 = time.perf_counter()
        length, node, pages = self.tiers.promote(m)
        promote_s = time.perf_counter() - t0
        promoted = [tier for _, tier in m.lower[: (length - m.l1_tokens) // bs]]
        reuse = length - bs if length == len(q) else length
        if reuse < length:
            node = tree.match_prefix(q[:reuse])[1] if reuse else tree.root
            pages = pages[:-1]
        tree.lock(node)
        try:
            private = self.tiers.allocate_pages(total - len(pages))
        except BaseException:
            tree.unlock(node)
            raise
        info = RequestTiers(l1_tokens=m.l1_tokens, l2_tokens=promoted.count(L2) * bs,
                            l3_tokens=promoted.count(L3) * bs, promote_s=promote_s,
                            prefetch_wait_s=waited)
        self._requests[request_id] = _Request(node, q[:reuse].copy(), pages + private, info)
        c = self._counters
        c.lookups += 1
        c.lookup_tokens += len(q)
        c.hit_tokens[L1] += info.l1_tokens
        c.hit_tokens[L2] += info.l2_tokens
        c.hit_tokens[L3] += info.l3_tokens
        c.prefill_tokens_saved += reuse
        c.promote_s += promote_s
        c.prefetch_wait_s += waited
        return list(pages), q[reuse:].copy()

    def commit(self, request_id: int, token_ids: Any) -> int:
        """Cache the full blocks of ``token_ids``, whose K/V the request computed.

        Returns the number of newly cached tokens; the request's lock moves to the end
        of ``token_ids``' full blocks.
        """
        req = self._request(request_id)
        q = as_token_array(token_ids, self.tiers.tree.vocab_size)
        bs, tree = self.block_size, self.tiers.tree
        if len(q) > len(req.table) * bs:
            raise ValueError(f"{len(q)} tokens > {len(req.table) * bs} slots")
        if not np.array_equal(q[: len(req.prefix)], req.prefix):
            raise ValueError("token_ids do not extend the request's cached prefix")
        full = q[: len(q) - len(q) % bs]
        if len(full) <= len(req.prefix):
            return 0
        # insert frees the request's pages of blocks the tree already held ...
        new = self.tiers.insert(full, req.table[: len(full) // bs])
        node = tree.match_prefix(full)[1]
        req.table[: len(full) // bs] = tree.path_blocks(node)  # ... so use the tree's
        tree.lock(node)
        tree.unlock(req.node)
        req.node, req.prefix = node, full.copy()
        return new

    def release(self, request_id: int) -> None:
        """End ``request_id``: unlock its prefix and free its private pages."""
        req = self._request(request_id)
        self.tiers.tree.unlock(req.node)
        self.tiers.free_pages(req.table[len(req.prefix) // self.block_size :])
        del self._requests[request_id]

    def evict(self, num_blocks: int) -> list[int]:
        """Evict (demote) up to ``num_blocks`` unlocked L1 blocks; the freed pages."""
        return self.tiers.evict(num_blocks)

    def persist(self) -> int:
        """Write every L1/L2 block L3 lacks to L3 (so a later process finds them)."""
        return self.tiers.persist()

    # ------------------------------------------------------------------ queries
    def requests(self) -> list[int]:
        """Ids of the live requests, in lookup order."""
        return list(self._requests)

    def block_table(self, request_id: int) -> list[int]:
        """The request's device pages, in token order."""
        return list(self._request(request_id).table)

    def hit_tokens(self, request_id: int) -> int:
        """Prompt tokens of ``request_id`` found in some tier and brought into L1."""
        t = self._request(request_id).tiers
        return t.l1_tokens + t.l2_tokens + t.l3_tokens

    def request_tiers(self, request_id: int) -> RequestTiers:
        return self._request(request_id).tiers

    def cached_prefix_len(self, token_ids: Any) -> int:
        """Tokens of ``token_ids`` a lookup would find now (as the prefetch policy allows)."""
        return self._usable(self.tiers.find(token_ids)).length

    def stats(self) -> PrefixCacheStats:
        """Counters in the shape of ``PrefixCache.stats`` (hits in any tier)."""
        c, tree, st = self._counters, self.tiers.tree, self.tiers.stats
        hit = sum(c.hit_tokens.values())
        return PrefixCacheStats(
            lookups=c.lookups, lookup_tokens=c.lookup_tokens, hit_tokens=hit,
            hit_rate=hit / c.lookup_tokens if c.lookup_tokens else 0.0,
            prefill_tokens_saved=c.prefill_tokens_saved, evictions=st.evictions,
            evicted_blocks=st.evicted_blocks, locked_blocks=tree.locked_blocks,
            tree_blocks=tree.total_blocks, free_blocks=self.tiers.num_free_pages)

    def stats_dict(self) -> dict[str, Any]:
        """Every tier counter: hits per tier, blocks and bytes moved, times, bandwidths."""
        c, st, host = self._counters, self.tiers.stats, self.tiers.host.stats
        disk = self.tiers.disk
        ds = disk.stats if disk is not None else None
        hit = sum(c.hit_tokens.values())
        return {
            "lookups": c.lookups, "lookup_tokens": c.lookup_tokens,
            "hit_tokens": dict(c.hit_tokens), "miss_tokens": c.lookup_tokens - hit,
            "hit_rate": hit / c.lookup_tokens if c.lookup_tokens else 0.0,
            "prefill_tokens_saved": c.prefill_tokens_saved,
            "blocks": {"evicted_from_l1": st.evicted_blocks, "l1_to_l2": st.demoted_to_l2,
                       "to_l3": st.spilled_to_l3, "persisted_to_l3": st.persisted,
                       "dropped": st.dropped,
                       "l2_to_l1": st.promoted[L2], "l3_to_l1": st.promoted[L3],
                       "l3_to_l2_prefetched": st.prefetched,
                       "l3_read_failures": st.promote_misses},
            "bytes": {"device_to_host": host.bytes_to_host,
                      "host_to_device": host.bytes_to_device,
                      "to_disk": ds.bytes_written if ds else 0,
                      "from_disk": ds.bytes_read if ds else 0},
            "seconds": {"device_to_host": host.seconds_to_host,
                        "host_to_device": host.seconds_to_device,
                        "disk_write": ds.seconds_written if ds else 0.0,
                        "disk_read": ds.seconds_read if ds else 0.0,
                        "promote": c.promote_s, "prefetch_wait": c.prefetch_wait_s,
                        "prefetch_hidden": c.prefetch_hidden_s,
                        "prefetch_read": st.prefetch_read_s},
            "gbps": {"device_to_host": host.gbps_to_host,
                     "host_to_device": host.gbps_to_device,
                     "disk_write": _gbps(ds.bytes_written, ds.seconds_written) if ds else 0.0,
                     "disk_read": _gbps(ds.bytes_read, ds.seconds_read) if ds else 0.0},
            "prefetches": c.prefetches,
            "l3": {"configured": disk is not None,
                   "backend": disk.backend if disk is not None else None,
                   "enabled": bool(disk is not None and disk.enabled),
                   "disabled_reason": disk.disabled_reason if disk is not None else None,
                   "read_misses": dict(ds.miss_reasons) if ds else {}},
        }

    def check_invariants(self) -> None:
        """The tiers' own checks, plus every device page free, in the tree, or one request's."""

        def fail(msg: str) -> None:
            raise AssertionError(f"tiered requests invariant violated: {msg}")

        self.tiers.check_invariants()
        tree, bs = self.tiers.tree, self.block_size
        if tree.num_locks != len(self._requests):
            fail(f"{tree.num_locks} tree locks for {len(self._requests)} requests")
        private: list[int] = []
        for rid, req in self._requests.items():
            split = len(req.prefix) // bs
            if req.node.pins < 1 or tree.path_blocks(req.node) != req.table[:split]:
                fail(f"request {rid}: table does not start with its locked path")
            if not np.array_equal(tree.path_tokens(req.node), req.prefix):
                fail(f"request {rid}: cached path tokens differ from its prefix")
            private += req.table[split:]
        tree_pages = set(self.tiers.l1_pages)
        if len(set(private)) != len(private) or tree_pages & set(private):
            fail("a private page is shared or in the tree")
        if len(private) + len(tree_pages) + self.tiers.num_free_pages != self.tiers.num_pages:
            fail("device pages leaked")
