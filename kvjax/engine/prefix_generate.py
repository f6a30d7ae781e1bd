"""Generation over one persistent paged KV pool with a radix prefix cache.

``PrefixCachedGenerator`` keeps a device page pool ``[L, P, S, K, D]`` and a host-side
:class:`~kvjax.memory.prefix_cache.PrefixCache` (RadixAttention's radix tree over the
reference-counted :class:`~kvjax.memory.allocator.BlockAllocator`) alive across calls.
Per request:

1. ``lookup`` shares the longest cached block-aligned prefix of the prompt into the
   request's block table and reserves blocks for the rest of the prompt *and* the
   ``max_new_tokens`` budget at once, evicting least recently used unlocked tree
   leaves when the pool is full (all of a request's blocks or none).
2. Only the suffix ``prompt[matched:]`` is prefilled, at positions ``matched, ...``,
   through the paged cache in one jitted step (a right-padded batch of suffixes).
   ``PagedCache.update_and_attend`` writes the new tokens into their pages and
   attends causally over every page of the sequence, so the suffix attends to the
   cached prefix pages: chunked prefill over paged history.
3. The prompt's full blocks are committed to the tree right away (later requests of
   the same call can hit them), then the shared device decode loop
   (``kvjax.engine.generate.decode``) runs over the same pool, donated and returned.
4. The prompt + generated tokens whose K/V were computed (all but the last
   generated token, which is never fed back) are committed, and the request is
   released: its private blocks return to the pool, its cached blocks stay in the
   tree (unlocked, evictable).

Scheduling within one ``generate`` call.  Requests are taken in order and grouped:

* a *wave* is a run of consecutive requests prefilled in one step.  A request
  starts a new wave when it shares more full blocks with a prompt already in the
  current wave than the tree caches for it: prefilled together, it could not reuse
  them; one wave later, the earlier prompt's blocks are committed and it hits them.
  So N prompts that share a system prompt take two waves (the first prompt alone,
  then the rest, all hitting it), unrelated prompts one.
* a *group* is a run of waves decoded together in one device loop.  A request that
  does not fit next to the group's live requests (after evicting every unlocked
  cached block) closes the group: the group decodes, commits and releases, and the
  request starts the next group.  A request that cannot fit in the empty pool is a
  ``ValueError`` before any work.

With ``prefix_caching=False`` the same generator never looks up or commits, so it
is the paged baseline: same pool, same kernels, every prompt prefilled in full,
no wave splits.

Tiers.  With ``tiers`` (a :class:`~kvjax.memory.tiered_requests.TierConfig`) the
pool is L1 of a :class:`~kvjax.memory.hicache.TieredPrefixCache`, driven through
:class:`~kvjax.memory.tiered_requests.TieredRequests`: evicted blocks move down to
host slots (L2) and disk (L3) instead of being dropped, and a lookup promotes the
prompt's blocks found there into fresh device pages.  When a call starts, and after
every wave, the disk reads of the next ``prefetch_depth`` queued requests start in
a background thread, overlapping the current wave's work; each lookup then waits
for its reads as the prefetch policy says.  L3 keys are namespaced by
``TierConfig.namespace`` and the model's configuration and dtype.

Outputs.  Greedy outputs equal ``generate(..., cache="dense")``: the cached K/V of a
prefix is what a full prefill would compute (up to float rounding order).  Request
``i`` of a call draws from ``sample_keys(seed, [i])[0]``, so sampled outputs equal
``generate(..., keys=sample_keys(seed, range(n)))`` up to the same rounding.

Timing.  ``ttft_s`` of a request is the wall time from the start of the call until
the logits of its first token are ready on device (``jax.block_until_ready`` after
its wave's prefill step; drawing the token from them happens in the decode loop),
so it includes the lookups, the earlier prefill waves of its group and, when the
pool forced several groups, the earlier groups' decoding.  ``prefill_s`` is its
wave's step alone.  ``total_s`` ends when every output is on the host.  The first
call with new shapes includes compilation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import PagedCache, check_attention_backend
from kvjax.engine.generate import (
    GenerationOutput,
    decode,
    forward_step,
    kv_bytes_per_token,
    resolve_attention,
    sample_keys,
    stop_array,
    to_output,
    validate_prompts,
)
from kvjax.engine.sampling import GREEDY, SamplingArrays, SamplingParams
from kvjax.engine.shapes import pow2, prefill_width, round_up, table_width
from kvjax.memory.allocator import BlockAllocator, OutOfBlocksError
from kvjax.memory.prefix_cache import PrefixCache, PrefixCacheStats
from kvjax.memory.tiered_requests import TierConfig, TieredRequests
from kvjax.models.llama import Decoder


@dataclasses.dataclass(frozen=True)
class RequestStats:
    """What the prefix cache did for one request of a call."""

    prompt_tokens: int
    hit_tokens: int  # prompt tokens found cached (block aligned; a full hit counts all)
    prefill_tokens_saved: int  # cached tokens reused, not recomputed (a full hit
    #                            recomputes its last block for the logits)
    prefill_tokens_computed: int  # suffix tokens prefilled (padding not counted)
    reused_blocks: tuple[int, ...]  # pool blocks shared into the request's table
    wave: int  # prefill wave of the call (0-based)
    group: int  # decode group of the call (0-based)
    ttft_s: float  # call start -> first-token logits ready on device
    prefill_s: float  # the request's wave prefill step alone (device-synchronised)
    l2_hit_tokens: int = 0  # of hit_tokens, promoted from host slots (tiers only)
    l3_hit_tokens: int = 0  # of hit_tokens, promoted from disk (tiers only)
    promote_s: float = 0.0  # lookup's host -> device copies and disk reads (tiers only)
    prefetch_wait_s: float = 0.0  # lookup blocked on prefetch reads (tiers only)


@dataclasses.dataclass(frozen=True)
class PrefixGenerationStats:
    """Per-request statistics and totals of one ``generate`` call."""

    requests: list[RequestStats]
    prompt_tokens: int
    hit_tokens: int
    prefill_tokens_computed: int
    prefill_tokens_saved: int
    evictions: int  # eviction rounds during the call
    evicted_blocks: int
    waves: int
    groups: int
    total_s: float  # call start -> every output on the host

    @property
    def hit_rate(self) -> float:
        """hit_tokens / prompt_tokens."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly totals and per-request rows."""
        out = dataclasses.asdict(self)
        out["hit_rate"] = self.hit_rate
        for row in out["requests"]:
            row["reused_blocks"] = list(row["reused_blocks"])
        return out


@dataclasses.dataclass
class _Live:
    """A request of the current group: admitted, prefilled, waiting for decode."""

    index: int  # position in the call's prompts
    rid: int  # request / sequence id in the cache and the allocator
    prompt: list[int]
    start: int  # first prompt position prefilled (tokens before it were reused)
    hit: int
    reused: tuple[int, ...]
    wave: int = 0
    group: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    l2_hit: int = 0
    l3_hit: int = 0
    promote_s: float = 0.0
    prefetch_wait_s: float = 0.0


def _common_full_blocks(a: Sequence[int], b: Sequence[int], block_size: int) -> int:
    """Tokens in the longest common block-aligned prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    common = int(diff[0]) if diff.size else n
    return common - common % block_size


def model_namespace(model: Decoder, name: str) -> str:
    """L3 key namespace: ``name`` (naming the weights) + the model's configuration and dtype."""
    digest = hashlib.sha256(repr((model.cfg, str(jnp.dtype(model.dtype)))).encode())
    return f"{name}/{digest.hexdigest()[:16]}"


class PrefixCachedGenerator:
    """Batched generation with a prefix cache over one persistent paged KV pool.

    See the module docstring for the request life cycle, the wave/group schedule,
    the tiers and the timing definitions.  Not thread safe.
    """

    def __init__(self, model: Decoder, params: Any, *, num_blocks: int, block_size: int = 16,
                 capacity_blocks: int | None = None, prefix_caching: bool = True,
                 device_blocks: int | None = None, tiers: TierConfig | None = None,
                 attention: str = "xla") -> None:
        """Allocate the device pool of ``num_blocks`` pages of ``block_size`` tokens.

        ``capacity_blocks`` caps how many blocks the tree may keep (default: as many
        as the pool has room for); ``prefix_caching=False`` gives the paged baseline.
        ``device_blocks`` (default ``num_blocks``) sizes the device pool larger than the
        ``num_blocks`` the allocator manages; the extra pages are never used, but
        generators of different ``num_blocks`` with one ``device_blocks`` share every
        compiled step (a pool-size sweep compiles once). Step cost does not depend on
        the pool size: attention reads only the pages in the block tables.
        ``tiers`` puts host and disk tiers under the pool (not with ``capacity_blocks``
        or ``prefix_caching=False``). ``attention`` is the pool's backend
        (``PagedCache.attention``; "auto" = the kernels on a GPU when the page layout
        suits them, see ``kvjax.engine.generate.resolve_attention``). The default, "xla",
        keeps the gather reference everywhere; on a GPU it forms the whole
        ``[rows, heads, queries, keys]`` score tensor of a prefill step, which XLA was
        seen to compile for minutes at 4 rows x 2.7k tokens.
        """
        device_blocks = num_blocks if device_blocks is None else device_blocks
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("device_blocks", device_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if device_blocks < num_blocks:
            raise ValueError(f"device_blocks={device_blocks} < num_blocks={num_blocks}")
        if tiers is not None and (capacity_blocks is not None or not prefix_caching):
            raise ValueError("tiers need prefix_caching and no capacity_blocks")
        cfg = model.cfg
        attention = resolve_attention(attention, block_size, cfg.head_dim)
        check_attention_backend(attention, block_size, cfg.head_dim)
        self.attention = attention
        self.model = model
        self.params = params
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = bool(prefix_caching)
        shape = (cfg.num_layers, device_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self._k = jnp.zeros(shape, model.dtype)
        self._v = jnp.zeros(shape, model.dtype)
        self.cache: PrefixCache | TieredRequests
        self.allocator: BlockAllocator | None = None  # the L1-only cache's (and baseline's)
        if tiers is None:
            self.allocator = BlockAllocator(num_blocks, block_size, kv_bytes_per_token(model))
            self.cache = PrefixCache(self.allocator, capacity_blocks=capacity_blocks,
                                     vocab_size=cfg.vocab_size)
        else:
            self.cache = TieredRequests.build(
                self._pool(np.zeros((1, 1), np.int32), np.zeros((1,), np.int32)), tiers,
                num_pages=num_blocks, namespace=model_namespace(model, tiers.namespace),
                vocab_size=cfg.vocab_size)
        self.tiers = tiers
        self._next_id = 0

    # ------------------------------------------------------------------ queries
    @property
    def pages(self) -> tuple[jax.Array, jax.Array]:
        """The device pool ``(k_pages, v_pages)``, each ``[L, P, S, K, D]``, P = device_blocks.

        The next ``generate`` donates these buffers: copy them (``np.asarray``)
        to keep them.
        """
        return self._k, self._v

    def stats(self) -> PrefixCacheStats:
        """The prefix cache's counters since creation (hits in any tier with tiers)."""
        return self.cache.stats()

    def _tiered(self) -> TieredRequests:
        if not isinstance(self.cache, TieredRequests):
            raise ValueError("this generator has no tiers")
        return self.cache

    def tier_stats(self) -> dict[str, Any]:
        """With tiers: every tier counter since creation (``TieredRequests.stats_dict``)."""
        return self._tiered().stats_dict()

    def persist(self) -> int:
        """With tiers: write every cached block the disk lacks to it; how many were written."""
        return self._tiered().persist()

    def evict(self, num_blocks: int | None = None) -> list[int]:
        """Drop up to ``num_blocks`` (default: all) unlocked cached blocks to the pool."""
        return self.cache.evict(self.num_blocks if num_blocks is None else num_blocks)

    # ------------------------------------------------------------------ steps
    def _tables(self, rids: list[int], rows: int) -> np.ndarray:
        if isinstance(self.cache, TieredRequests):
            table = [self.cache.block_table(r) for r in rids]
        else:
            table = [self.cache.allocator.block_table(r) for r in rids]
        tables = np.full((rows, table_width(max(map(len, table)))), -1, np.int32)
        for row, t in enumerate(table):
            tables[row, : len(t)] = t
        return tables

    def _pool(self, tables: np.ndarray, lengths: np.ndarray) -> PagedCache:
        return PagedCache(k_pages=self._k, v_pages=self._v, block_tables=jnp.asarray(tables),
                          lengths=jnp.asarray(lengths, jnp.int32), attention=self.attention)

    def _keep(self, kv: PagedCache) -> None:
        """Adopt the pool a step returned (the tiers copy pages from and into it)."""
        self._k, self._v = kv.k_pages, kv.v_pages
        if isinstance(self.cache, TieredRequests):
            self.cache.tiers.cache = kv

    def _admit(self, rid: int, prompt: list[int], reserve: int) -> _Live | None:
        """Reserve the request's blocks (sharing its cached prefix); None if no room."""
        try:
            if not self.prefix_caching:
                assert self.allocator is not None  # the baseline never has tiers
                self.allocator.allocate_sequence(rid, len(prompt) + reserve)
                return _Live(-1, rid, prompt, 0, 0, ())
            reused, suffix = self.cache.lookup(rid, prompt, reserve_tokens=reserve)
        except OutOfBlocksError:
            return None
        live = _Live(-1, rid, prompt, len(prompt) - len(suffix), self.cache.hit_tokens(rid),
                     tuple(reused))
        if isinstance(self.cache, TieredRequests):
            pool = self.cache.tiers.cache  # promotion wrote (and donated) the pool
            self._k, self._v = pool.k_pages, pool.v_pages
            t = self.cache.request_tiers(rid)
            live.l2_hit, live.l3_hit = t.l2_tokens, t.l3_tokens
            live.promote_s, live.prefetch_wait_s = t.promote_s, t.prefetch_wait_s
        return live

    def _release(self, live: _Live) -> None:
        if self.prefix_caching:
            self.cache.release(live.rid)
        else:
            assert self.allocator is not None
            self.allocator.free_sequence(live.rid)

    def _prefetch(self, pending: deque[int], prompts: list[list[int]]) -> None:
        """With tiers: start the disk reads of the next ``prefetch_depth`` queued requests.

        Blocks already in L2 or being read are skipped, so a request seen again (its
        reads did not all fit in L2 last time) only reads what is still missing.
        """
        if not isinstance(self.cache, TieredRequests) or self.tiers is None:
            return
        for i in list(pending)[: self.tiers.prefetch_depth]:
            self.cache.prefetch(prompts[i])

    def _prefill(self, wave: list[_Live]) -> jax.Array:
        """One jitted step over the wave's suffixes; first-token logits [len(wave), V]."""
        rows = pow2(len(wave))
        width = prefill_width(max(len(r.prompt) - r.start for r in wave))
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        last = np.zeros((rows,), np.int32)
        starts = np.zeros((rows,), np.int32)
        for row, r in enumerate(wave):
            n = len(r.prompt) - r.start
            tokens[row, :n] = r.prompt[r.start :]
            positions[row, :n] = np.arange(r.start, len(r.prompt))
            last[row], starts[row] = n - 1, r.start
        kv = self._pool(self._tables([r.rid for r in wave], rows), starts)
        logits, kv = forward_step(self.model, self.params, jnp.asarray(tokens),
                                  jnp.asarray(positions), kv, jnp.asarray(last))
        self._keep(kv)
        return logits[: len(wave)]

    def _decode(self, group: list[_Live], logits: list[jax.Array], limits: list[int],
                sampling: list[SamplingParams], stops: np.ndarray, seed: int) -> jax.Array:
        """The shared device decode loop over the group; ids int32 [len(group), N]."""
        n, rows = len(group), pow2(len(group))
        idx = [r.index for r in group]
        first = jnp.concatenate(logits, axis=0)
        if rows > n:
            first = jnp.concatenate([first, jnp.zeros((rows - n, first.shape[1]), first.dtype)])
        pad = rows - n
        lengths = np.asarray([len(r.prompt) for r in group] + [0] * pad, np.int32)
        max_new = np.asarray([limits[i] for i in idx] + [0] * pad, np.int32)
        stop_rows = np.concatenate([stops[idx], np.full((pad, stops.shape[1]), -1, np.int32)])
        sp = SamplingArrays.from_params([sampling[i] for i in idx] + [GREEDY] * pad)
        keys = sample_keys(seed, idx + [0] * pad)
        kv = self._pool(self._tables([r.rid for r in group], rows), lengths)
        # A fresh lengths array: kv (and so kv.lengths) is donated to the loop.
        out, kv = decode(self.model, self.params, first, jnp.asarray(lengths),
                         jnp.asarray(max_new), jnp.asarray(stop_rows), sp, keys, kv,
                         num_steps=round_up(max(limits[i] for i in idx), 32),
                         all_greedy=all(sampling[i].greedy for i in idx))
        self._keep(kv)
        return out[:n]

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int | Sequence[int],
                 sampling: SamplingParams | Sequence[SamplingParams] = GREEDY, seed: int = 0,
                 stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
                 ) -> tuple[GenerationOutput, PrefixGenerationStats]:
        """Generate for ``prompts`` in order, reusing and extending the prefix cache.

        Arguments as in ``kvjax.engine.generate.generate``.  Returns the outputs and
        this call's statistics.  Raises ``ValueError`` (before any work) for bad
        prompts or a request that cannot fit in the pool even alone.
        """
        t0 = time.perf_counter()
        cfg = self.model.cfg
        b = len(prompts)
        limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
        samp = [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling)
        if len(limits) != b or len(samp) != b:
            raise ValueError("per-prompt max_new_tokens and sampling must have one entry per "
                             "prompt")
        validate_prompts(cfg, prompts, limits)
        per_seq_stops, stops = stop_array(stop_token_ids, b)
        plist = [[int(t) for t in p] for p in prompts]
        bs = self.block_size
        for i, (p, n) in enumerate(zip(plist, limits, strict=True)):
            need = -(-(len(p) + n) // bs)
            if need > self.num_blocks:
                raise ValueError(f"prompt {i}: {len(p)} prompt + {n} new tokens need {need} "
                                 f"blocks of {bs} tokens, but the pool has {self.num_blocks}")
        before = self.cache.stats()
        tokens: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        done: list[_Live] = []
        pending = deque(range(b))
        wave_no = group_no = 0
        try:
            while pending:
                group: list[_Live] = []
                logits: list[jax.Array] = []
                try:
                    while pending:
                        self._prefetch(pending, plist)
                        wave = self._next_wave(pending, plist, limits, first=not group)
                        if not wave:
                            break
                        group += wave  # admitted: released below whatever happens
                        for r in wave:
                            r.wave, r.group = wave_no, group_no
                        step_start = time.perf_counter()
                        wave_logits = self._prefill(wave)
                        jax.block_until_ready(wave_logits)
                        now = time.perf_counter()
                        for r in wave:
                            r.ttft_s, r.prefill_s = now - t0, now - step_start
                            if self.prefix_caching:
                                self.cache.commit(r.rid, r.prompt)
                        logits.append(wave_logits)
                        wave_no += 1
                    if max(limits[r.index] for r in group) > 0:
                        out = self._decode(group, logits, limits, samp, stops, seed)
                        result = to_output(out, [per_seq_stops[r.index] for r in group])
                        for row, r in enumerate(group):
                            tokens[r.index] = result.tokens[row]
                            reasons[r.index] = result.finish_reasons[row]
                            if self.prefix_caching and len(result.tokens[row]) > 1:
                                self.cache.commit(r.rid, r.prompt + result.tokens[row][:-1])
                finally:
                    for r in group:
                        self._release(r)
                done += group
                group_no += 1
        finally:
            if isinstance(self.cache, TieredRequests):
                self.cache.drain()  # no read outlives the call
        after = self.cache.stats()
        total = time.perf_counter() - t0
        done.sort(key=lambda r: r.index)
        rows = [RequestStats(
            prompt_tokens=len(r.prompt), hit_tokens=r.hit, prefill_tokens_saved=r.start,
            prefill_tokens_computed=len(r.prompt) - r.start, reused_blocks=r.reused,
            wave=r.wave, group=r.group, ttft_s=r.ttft_s, prefill_s=r.prefill_s,
            l2_hit_tokens=r.l2_hit, l3_hit_tokens=r.l3_hit, promote_s=r.promote_s,
            prefetch_wait_s=r.prefetch_wait_s) for r in done]
        stats = PrefixGenerationStats(
            requests=rows, prompt_tokens=sum(len(p) for p in plist),
            hit_tokens=sum(r.hit_tokens for r in rows),
            prefill_tokens_computed=sum(r.prefill_tokens_computed for r in rows),
            prefill_tokens_saved=sum(r.prefill_tokens_saved for r in rows),
            evictions=after.evictions - before.evictions,
            evicted_blocks=after.evicted_blocks - before.evicted_blocks,
            waves=wave_no, groups=group_no, total_s=total)
        return GenerationOutput(tokens=tokens, finish_reasons=reasons), stats

    def _next_wave(self, pending: deque[int], prompts: list[list[int]], limits: list[int], *,
                   first: bool) -> list[_Live]:
        """Admit the next wave from the front of ``pending`` (see the module docstring)."""
        wave: list[_Live] = []
        try:
            while pending:
                i = pending[0]
                prompt = prompts[i]
                if wave and self.prefix_caching:
                    shared = max(_common_full_blocks(prompt, r.prompt, self.block_size)
                                 for r in wave)
                    if shared > self.cache.cached_prefix_len(prompt):
                        break
                rid = self._next_id
                live = self._admit(rid, prompt, limits[i])
                if live is None:
                    if first and not wave:  # nothing else is live: checked up front
                        raise AssertionError(f"prompt {i} does not fit in an empty pool")
                    break
                self._next_id += 1
                live.index = i
                wave.append(live)
                pending.popleft()
        except BaseException:
            for r in wave:
                self._release(r)
            raise
        return wave
