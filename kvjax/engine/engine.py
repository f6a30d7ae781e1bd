"""A continuous-batching engine core over one persistent paged KV pool (vLLM/SGLang style).

Requests arrive at any time (``add_request``) and join the running batch at the next
``step``. Each step plans how many tokens every running request computes, under a
per-step token budget (``max_tokens_per_step``, shared by all rows):

* a decoding request feeds back its last sampled token (one token); decodes are
  planned first, so the budget (at least ``max_batch``) always covers every one;
* a request still prefilling takes the next chunk of its prompt, at most
  ``prefill_chunk`` tokens and at most what is left of the budget, oldest admission
  first (chunked prefill), in at most ``max_chunk_rows = max_tokens_per_step // W``
  rows; a request the budget does not reach sits this step out.

The planned rows then run as at most two jitted forwards over the pool (the cache is
donated from one to the next, and both are dispatched before the host waits):

* every one-token row in a ``[R, 1]`` slot array (decode), ``R`` the smallest power of
  two >= the rows and >= ``MIN_DECODE_ROWS`` (at most ``max_batch``): a step is
  bound by reading the weights up to a few dozen rows, so ``R`` = 8 costs what 1 does, but a
  lightly loaded engine does not pay for ``max_batch`` rows (a 32-row burst of a
  Qwen2.5-0.5B shape takes 1.31 ms a step on an H100, an 8-row one 1.11 ms);
* every longer chunk in a ``[R, W]`` slot array, ``R`` a power of two >= the rows
  (at most ``max_chunk_rows``) and ``W = min(prefill_chunk, max_tokens_per_step)``,
  so the chunk forward computes at most the budget's worth of slots, padding
  included. ``PagedCache.update_and_attend`` writes each chunk into its request's
  pages and attends causally over all of them.

Unused slots have position -1 (never stored, never attended). The block-table width
of each forward is a power of two >= 8 (capped by the model context), so a long run
compiles a handful of programs (``precompile`` builds them all up front) and a decode
step never pays for a prefill's width. A row whose chunk reaches the end of its tokens
samples the next token in the same call (logits at the chunk's last slot).

Scheduling (host side, per step):

1. Running requests, oldest admission first, reserve blocks for this step's tokens.
   When the pool is empty the most recently admitted running request is preempted:
   its blocks are freed and it goes back to the FRONT of the waiting queue; its prompt
   becomes prompt + generated tokens (its budget of new tokens is what is left). With
   ``preemption="recompute"`` it prefills them again when re-admitted (greedy outputs
   are unchanged, up to float rounding order). With ``preemption="swap"`` the K/V it
   has computed are first copied to slots of a host pool
   (``kvjax.memory.host_pool.HostPool``, ``swap_blocks`` pages) and copied back into
   fresh blocks at re-admission, so it continues with bit-identical K/V and computes
   nothing again; a victim the host pool cannot hold falls back to recompute.
2. If nothing was preempted this step, waiting requests are admitted FCFS (no
   skipping) while a row and some budget are free and the pool holds the request's
   whole prompt plus one block per running request (a watermark against
   admit-then-preempt thrashing); the whole prompt is reserved at admission.
3. The forwards run; sampled tokens are appended; a request that hit a stop id, a stop
   string or its ``max_new_tokens`` retires at once and frees its blocks, so a waiting
   request can take its row at the next step.

A request whose prompt + ``max_new_tokens`` cannot fit in the empty pool is rejected by
``add_request``, so the oldest running request can always make progress (it may
preempt every other one) and the engine never deadlocks.

Prefix caching (``prefix_caching=True``): a ``kvjax.memory.prefix_cache.PrefixCache``
(RadixAttention's radix tree over the same allocator) shares the longest cached
block-aligned prefix of a request's tokens into its block table at admission, so only
the rest is prefilled. A request's full blocks are committed to the tree when its
prefill ends and when it leaves the batch (finished, cancelled or preempted: a
preempted request usually finds its own blocks again). Cached blocks nobody uses stay
in the pool until a reservation needs them (least recently used first).

Stop strings need ``detokenize`` (token ids -> text): after each new token the whole
output is detokenized and the request stops once the text contains a stop string;
the token that completed it is kept, like a stop id.

Sampling: request with seed ``s`` draws its ``i``-th new token (0-based) with key
``fold_in(sample_keys(s, [0])[0], i)``, independent of the batch and of preemption,
so it matches ``generate([prompt], keys=sample_keys(s, [0]))``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from kvjax.cache.paged import PagedCache, check_attention_backend
from kvjax.engine.generate import (
    GenerationOutput,
    attention_label,
    kv_bytes_per_token,
    resolve_attention,
)
from kvjax.engine.sampling import GREEDY, SamplingArrays, SamplingParams, sample
from kvjax.engine.shapes import pow2
from kvjax.memory.allocator import AllocatorStats, BlockAllocator, OutOfBlocksError
from kvjax.memory.host_pool import HostPool, HostPoolStats
from kvjax.memory.prefix_cache import PrefixCache
from kvjax.models.fused_decode import FusedLaunch, check_fusable, fused_decode_step
from kvjax.models.llama import Decoder

Event = tuple[int, int]  # (request id, new token id)
Detokenize = Callable[[Sequence[int]], str]

logger = logging.getLogger(__name__)


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if xs else 0.0


@dataclasses.dataclass(frozen=True)
class Request:
    """What a client asks for.

    ``stop_token_ids`` and ``stop_strings`` end the request; the token that hit one is
    kept. Stop strings need an engine built with ``detokenize``.
    """

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Timings of one finished (or cancelled) request, seconds, host wall clock."""

    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # arrival -> first token on the host (None: no token)
    itl_s: tuple[float, ...]  # inter-token latencies
    e2e_s: float  # arrival -> retired
    preemptions: int
    cached_tokens: int  # tokens taken from the prefix cache, over all its admissions
    finish_reason: str  # "stop", "length" or "cancelled"

    @property
    def itl_p50_s(self) -> float:
        return _percentile(self.itl_s, 50)

    @property
    def itl_p99_s(self) -> float:
        return _percentile(self.itl_s, 99)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.e2e_s if self.e2e_s > 0 else 0.0


Shape = tuple[int, int, int]  # (rows, width, table width) of one forward's slot array


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """One ``step``: rows used, tokens computed, shapes run, preemptions, wall time."""

    rows: int  # running requests (each holds a batch row)
    max_batch: int
    waiting: int  # requests left in the queue after admission
    prefill_tokens: int  # prompt (or recompute) tokens computed
    decode_tokens: int  # rows that fed back one sampled token
    cached_tokens: int  # tokens the requests admitted this step took from the prefix cache
    shapes: tuple[Shape, ...]  # the forwards run (decode first)
    new_tokens: int  # tokens sampled
    preempted: int
    admitted: int
    start: float  # time.perf_counter() when the step began
    duration_s: float
    decode_steps: int = 1  # decode forwards run (> 1: a device-loop burst)

    @property
    def occupancy(self) -> float:
        """Fraction of batch rows holding a request."""
        return self.rows / self.max_batch

    @property
    def computed_tokens(self) -> int:
        """Tokens this step computed: what the token budget bounds (per forward: a burst
        of ``decode_steps`` forwards computes up to that many times the budget)."""
        return self.prefill_tokens + self.decode_tokens


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """Totals over every step and every retired request so far."""

    steps: int
    generated_tokens: int
    busy_s: float  # time spent inside ``step``
    tokens_per_s: float  # generated_tokens / busy_s
    mean_occupancy: float
    preemptions: int
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    prefix_lookup_tokens: int  # tokens looked up in the prefix cache at admissions
    prefix_hit_tokens: int  # of those, found cached (block aligned)
    swapped_out_blocks: int = 0  # pages copied to the host pool by swap preemptions
    swapped_in_blocks: int = 0  # pages copied back at re-admission
    swap_gbps_to_host: float = 0.0  # measured copy rates of those swaps
    swap_gbps_to_device: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return (self.prefix_hit_tokens / self.prefix_lookup_tokens
                if self.prefix_lookup_tokens else 0.0)


@dataclasses.dataclass(eq=False)  # identity: states are found in the queues by `is`
class _State:
    """Engine-side life of a request."""

    rid: int
    request: Request
    stops: frozenset[int]
    arrival: float
    output: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens of ``tokens`` whose K/V are in the pool
    token_times: list[float] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    cached: int = 0  # tokens taken from the prefix cache, all admissions
    admitted: bool = False
    prefilling: bool = False  # admitted and not yet sampled since
    swap_slots: list[int] = dataclasses.field(default_factory=list)  # host pool, in order
    swapped: int = 0  # tokens whose K/V the swap slots hold (0: not swapped out)

    @property
    def tokens(self) -> list[int]:
        """Everything the sequence holds: prompt + generated (the recompute prompt)."""
        return [*self.request.prompt, *self.output]

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.output)

    def span(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building the whole list."""
        prompt = self.request.prompt
        n = len(prompt)
        if end <= n:
            return list(prompt[start:end])
        if start >= n:
            return self.output[start - n : end - n]
        return [*prompt[start:], *self.output[: end - n]]


@dataclasses.dataclass
class _Burst:
    """A decode burst dispatched to the device; its ids are read by ``_collect``."""

    states: list[_State]  # row i of the burst is states[i]; rows past them are padding
    active: list[int]  # tokens each of ``states`` computes (0: the row sits it out)
    ids: jax.Array  # int32 [rows, steps], not waited for
    tables: np.ndarray  # int32 [rows, M]


@jax.jit
def _last_ids(ids: jax.Array, active: jax.Array) -> jax.Array:
    """Each row's last sampled id of a burst: ids int32 [B, N], active int32 [B] -> [B]
    (rows with ``active == 0`` get an arbitrary id; they sit the next burst out)."""
    return ids[jnp.arange(ids.shape[0]), jnp.maximum(active - 1, 0)]


@partial(jax.jit, static_argnames=("model", "attention", "all_greedy"),
         donate_argnames=("k_pages", "v_pages"))
def _engine_step(model: Decoder, params: Any, k_pages: jax.Array, v_pages: jax.Array,
                 tokens: ArrayLike, positions: ArrayLike, tables: ArrayLike, lengths: ArrayLike,
                 logit_index: ArrayLike, sp: SamplingArrays, seeds: ArrayLike,
                 draws: ArrayLike, *, attention: str, all_greedy: bool
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Forward the slot array [B, W] over the pool and sample one token per row.

    k_pages, v_pages [L, P, S, K, D] (donated); tokens, positions int32 [B, W] (position
    -1 = empty slot); tables int32 [B, M]; lengths, logit_index int32 [B]; seeds uint32
    [B]; draws int32 [B]. Host arrays are fine: they are transferred in the call.
    Returns (sampled ids int32 [B], k_pages, v_pages). Row ``b`` draws with
    ``fold_in(fold_in(key(seeds[b]), 0), draws[b])``.
    """
    tokens, positions, tables = (jnp.asarray(a, jnp.int32) for a in (tokens, positions, tables))
    chex.assert_rank([tokens, positions, tables], 2)
    chex.assert_equal_shape([tokens, positions])
    chex.assert_shape(tables, (tokens.shape[0], None))
    cache = PagedCache(k_pages=k_pages, v_pages=v_pages, block_tables=tables,
                       lengths=jnp.asarray(lengths, jnp.int32), attention=attention)
    out: Any = model.apply({"params": params}, tokens, positions, cache,
                           logit_index=jnp.asarray(logit_index, jnp.int32))
    logits, cache = out
    nxt = _sample_rows(logits, sp, seeds, draws, all_greedy=all_greedy)
    return nxt, cache.k_pages, cache.v_pages


def _sample_rows(logits: jax.Array, sp: SamplingArrays, seeds: ArrayLike, draws: ArrayLike,
                 *, all_greedy: bool) -> jax.Array:
    """One token per row of ``logits`` [B, V]; row ``b`` draws with
    ``fold_in(fold_in(key(seeds[b]), 0), draws[b])`` -> int32 [B]."""
    if all_greedy:
        return sample(logits, jax.random.key(0), sp, all_greedy=True)

    def one(row: jax.Array, seed: jax.Array, draw: jax.Array, p: SamplingArrays) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), draw)
        p1 = jax.tree.map(lambda a: a[None], p)
        return sample(row[None], key, p1)[0]

    return jax.vmap(one)(logits, jnp.asarray(seeds, jnp.uint32), jnp.asarray(draws, jnp.int32),
                         sp)


@partial(jax.jit, static_argnames=("model", "steps", "attention", "all_greedy", "fused"),
         donate_argnames=("k_pages", "v_pages"))
def _engine_decode_burst(model: Decoder, params: Any, k_pages: jax.Array, v_pages: jax.Array,
                         tokens: ArrayLike, positions: ArrayLike, active: ArrayLike,
                         tables: ArrayLike, sp: SamplingArrays, seeds: ArrayLike,
                         draws: ArrayLike, *, steps: int, attention: str, all_greedy: bool,
                         fused: FusedLaunch | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``steps`` decode forwards in one device loop, each feeding back its samples.

    tokens, positions, active, draws int32 [B]: row ``b`` feeds ``tokens[b]`` at
    ``positions[b]`` and runs ``active[b]`` (0..steps) steps; at step ``j`` an active row
    sits at ``positions[b] + j`` and draws its ``draws[b] + j``-th token; inactive rows
    have position -1 (nothing written or read). tables int32 [B, M], seeds uint32 [B],
    k_pages/v_pages [L, P, S, K, D] (donated). Returns (ids int32 [B, steps]; entries at
    ``j >= active[b]`` are meaningless), k_pages, v_pages. Equal, token for token, to
    ``steps`` calls of ``_engine_step`` with width 1. ``fused``: each forward is
    ``fused_decode_step`` with this launch (the fused Triton layer kernels; ``attention``
    "triton") instead of the Flax model's.
    """
    tokens, positions, active, draws = (jnp.asarray(a, jnp.int32)
                                        for a in (tokens, positions, active, draws))
    tables = jnp.asarray(tables, jnp.int32)
    chex.assert_rank([tokens, positions, active, draws, tables], [1, 1, 1, 1, 2])
    chex.assert_equal_shape([tokens, positions, active, draws])

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        tok, k, v, ids = carry
        live = j < active
        pos = jnp.where(live, positions + j, -1)
        if fused is not None:
            logits, k, v = fused_decode_step(params, model.cfg, tok, pos, k, v, tables, fused)
        else:
            cache = PagedCache(k_pages=k, v_pages=v, block_tables=tables,
                               lengths=jnp.where(live, pos, 0), attention=attention)
            out: Any = model.apply({"params": params}, tok[:, None], pos[:, None], cache,
                                   logit_index=jnp.zeros_like(tok))
            logits, new = out
            k, v = new.k_pages, new.v_pages
        nxt = _sample_rows(logits, sp, seeds, draws + j, all_greedy=all_greedy)
        return nxt, k, v, ids.at[:, j].set(nxt)

    ids = jnp.zeros((tokens.shape[0], steps), jnp.int32)
    _, k_pages, v_pages, ids = lax.fori_loop(0, steps, body, (tokens, k_pages, v_pages, ids))
    return ids, k_pages, v_pages


PREEMPTION = ("recompute", "swap")
MIN_DECODE_ROWS = 8  # fewest rows of a decode forward (see the module docstring)

# The jitted step, for compile-count checks (``step_fn._cache_size()``).
step_fn = _engine_step


def compiled_programs() -> int:
    """Programs the jitted forwards have compiled so far (all engines and shapes)."""
    return sum(int(cast(Any, f)._cache_size()) for f in (_engine_step, _engine_decode_burst))


def _check_count(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _stop_strings(value: object) -> tuple[str, ...]:
    """One stop string or a sequence of them, checked: non-empty ``str`` only."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise ValueError(f"stop_strings must be a str or a sequence of str, got "
                         f"{type(value).__name__}")
    for s in value:
        if not isinstance(s, str):
            raise ValueError(f"stop string {s!r} has unsupported type {type(s).__name__} "
                             "(stop strings must be str)")
        if not s:
            raise ValueError("stop string is empty")
    return tuple(value)


class Engine:
    """Continuous batching over one persistent paged KV pool; see the module docstring.

    Args:
      model, params: the decoder and its parameters.
      num_blocks, block_size: the KV pool, in blocks of ``block_size`` tokens.
      max_batch: most requests running at once (rows of the decode forward).
      prefill_chunk: most prompt tokens one request computes in one step.
      max_tokens_per_step: token budget of a step, shared by every row (decodes count
        one each); at least ``max_batch``. Default ``max_batch * prefill_chunk`` (no
        limit beyond ``prefill_chunk`` per row).
      prefix_caching: reuse cached prompt prefixes across requests (radix tree).
      detokenize: token ids -> text; needed for stop strings.
      attention: paged attention backend ("auto", "xla", "pallas", "pallas-interpret",
        "triton").
      decode_steps: decode forwards per step when every running request is decoding and
        none is waiting: a device loop feeds each sampled token back without returning
        to the host in between (the tokens then arrive ``decode_steps`` at a time).
        Outputs are the same for any value; 1 (the default) is one forward per step.
      overlap_bursts: with ``decode_steps > 1``, dispatch the next burst before reading
        the current one's ids whenever no request is waiting: the device then runs the
        next burst while the host reads, streams and books the current one. A row that
        a stop id or string ends in the current burst has its tokens in the next one
        dropped (as a burst drops the tokens after a stop); a burst whose rows all
        ended is discarded unread, and a ``cancel`` first reads the burst in flight.
        Outputs are unchanged.
      preemption: "recompute" (free a victim's blocks; it prefills again) or "swap"
        (copy its K/V to a host pool first and back at re-admission).
      fused_decode: decode bursts run ``kvjax.models.fused_decode.fused_decode_step``
        (each layer's norms, projections, RoPE and residual adds in four fused Triton
        kernels around the decode kernel) instead of the Flax forward; needs attention
        "triton" (GPU). Outputs agree up to rounding (the same math, another kernel
        order); prefill chunks and single steps keep the Flax forward.
      fused_launch: with ``fused_decode``, how each layer piece runs (a
        ``kvjax.models.fused_decode.FusedLaunch``, or its dict form; None: the default).
      swap_blocks: pages the swap host pool holds (needed, >= 1, for "swap").
      host_staging: how swaps copy: one of ``kvjax.memory.host_pool.STAGING``.

    Not thread safe: call ``add_request``, ``cancel`` and ``step`` from one thread.
    """

    def __init__(self, model: Decoder, params: Any, *, num_blocks: int, block_size: int = 16,
                 max_batch: int = 8, prefill_chunk: int = 64,
                 max_tokens_per_step: int | None = None, prefix_caching: bool = False,
                 detokenize: Detokenize | None = None, attention: str = "auto",
                 decode_steps: int = 1, preemption: str = "recompute", swap_blocks: int = 0,
                 host_staging: str = "pageable", overlap_bursts: bool = False,
                 fused_decode: bool = False,
                 fused_launch: FusedLaunch | Mapping[str, Any] | None = None) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("decode_steps", decode_steps)):
            _check_count(name, value)
        budget = max_batch * prefill_chunk if max_tokens_per_step is None else max_tokens_per_step
        _check_count("max_tokens_per_step", budget, low=max_batch)
        if preemption not in PREEMPTION:
            raise ValueError(f"preemption must be one of {PREEMPTION}, got {preemption!r}")
        if preemption == "swap":
            _check_count("swap_blocks", swap_blocks)
        elif swap_blocks:
            raise ValueError("swap_blocks is only used with preemption='swap'")
        if detokenize is not None and not callable(detokenize):
            raise ValueError(f"detokenize must be callable, got {detokenize!r}")
        cfg = model.cfg
        self.model = model
        self.params = params
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_tokens_per_step = budget
        self.detokenize = detokenize
        self.decode_steps = decode_steps
        if not isinstance(overlap_bursts, bool):
            raise ValueError(f"overlap_bursts must be a bool, got {overlap_bursts!r}")
        self.overlap_bursts = overlap_bursts
        self._ahead: _Burst | None = None  # a burst in flight (overlap_bursts)
        self.overlapped_bursts = 0  # bursts dispatched before the previous one was read
        self.discarded_bursts = 0  # of those, dropped unread: every row stopped before
        self._pending: list[Event] = []  # tokens read early (by cancel), not yet returned
        self.attention = resolve_attention(attention, block_size, cfg.head_dim)
        check_attention_backend(self.attention, block_size, cfg.head_dim)
        if not isinstance(fused_decode, bool):
            raise ValueError(f"fused_decode must be a bool, got {fused_decode!r}")
        if fused_decode:
            if self.attention != "triton":
                raise ValueError(f"fused_decode needs attention 'triton' (the Triton kernels), "
                                 f"got {self.attention!r}")
            check_fusable(cfg)
        elif fused_launch is not None:
            raise ValueError("fused_launch is only used with fused_decode=True")
        if fused_launch is not None and not isinstance(fused_launch, FusedLaunch):
            fused_launch = FusedLaunch.from_dict(fused_launch)
        self.fused_decode = fused_decode
        self.fused_launch: FusedLaunch | None = (
            (fused_launch or FusedLaunch()) if fused_decode else None)
        self.allocator = BlockAllocator(num_blocks, block_size, kv_bytes_per_token(model))
        self.prefix_cache = (PrefixCache(self.allocator, vocab_size=cfg.vocab_size)
                             if prefix_caching else None)
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self._k = jnp.zeros(shape, model.dtype)
        self._v = jnp.zeros(shape, model.dtype)
        self.preemption = preemption
        self.host_pool: HostPool | None = None
        if preemption == "swap":
            self.host_pool = HostPool.like(self._pool_view(), swap_blocks, staging=host_staging)
        self.swapped_out_blocks = 0
        self.swapped_in_blocks = 0
        self._max_table = -(-cfg.max_position_embeddings // block_size)
        self._greedy: dict[int, SamplingArrays] = {}  # all-greedy sampling arrays by rows
        self._next_id = 0
        self._waiting: deque[_State] = deque()
        self._running: list[_State] = []  # admission order, oldest first
        self._states: dict[int, _State] = {}  # unfinished requests
        self.finished: dict[int, GenerationOutput] = {}  # rid -> its one-row output
        self.request_metrics: dict[int, RequestMetrics] = {}
        self.step_metrics: list[StepMetrics] = []
        logger.info("engine: paged attention %s%s", attention_label(self.attention),
                    ", fused decode layers" if fused_decode else "")

    # ------------------------------------------------------------------ requests
    def _validate(self, req: Request) -> None:
        cfg = self.model.cfg
        if len(req.prompt) == 0:
            raise ValueError("prompt is empty")
        bad = [t for t in req.prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt has token id {bad[0]} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        n = req.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {n!r}")
        if len(req.prompt) + n > cfg.max_position_embeddings:
            raise ValueError(f"{len(req.prompt)} prompt + {n} new tokens exceed the model's "
                             f"context of {cfg.max_position_embeddings}")
        bad = [t for t in req.stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        _stop_strings(req.stop_strings)
        if req.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an Engine built with detokenize=...")
        if not isinstance(req.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {req.sampling!r}")
        need = -(-(len(req.prompt) + n) // self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"{len(req.prompt)} prompt + {n} new tokens need {need} blocks "
                             f"of {self.block_size} tokens, but the pool has "
                             f"{self.num_blocks}")

    @staticmethod
    def _make_request(prompt: Sequence[int], max_new_tokens: int | None,
                      sampling: SamplingParams, stop_token_ids: Sequence[int],
                      stop_strings: str | Sequence[str], seed: int) -> Request:
        if max_new_tokens is None:
            raise ValueError("max_new_tokens is required")
        try:
            return Request(prompt=tuple(int(t) for t in prompt), max_new_tokens=max_new_tokens,
                           sampling=sampling, stop_token_ids=tuple(int(t) for t in stop_token_ids),
                           seed=int(seed), stop_strings=_stop_strings(stop_strings))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad request: {e}") from None

    def add_request(self, prompt: Sequence[int] | Request, *, max_new_tokens: int | None = None,
                    sampling: SamplingParams = GREEDY, stop_token_ids: Sequence[int] = (),
                    stop_strings: str | Sequence[str] = (), seed: int = 0,
                    arrival_time: float | None = None) -> int:
        """Queue a request (a ``Request``, or its fields); return its id.

        ``arrival_time`` (a ``time.perf_counter()`` value, default now) starts the
        request's TTFT and end-to-end clocks. Raises ``ValueError`` (nothing queued) for
        an empty prompt, token or stop ids outside the vocabulary, a stop string that is
        not a non-empty ``str`` (or stop strings without ``detokenize``),
        ``max_new_tokens < 0``, prompt + max_new_tokens beyond the model's context or
        beyond the whole pool. ``max_new_tokens == 0`` finishes at once with no tokens.
        """
        if isinstance(prompt, Request):
            r = prompt
            prompt, max_new_tokens, sampling, stop_token_ids, stop_strings, seed = (
                r.prompt, r.max_new_tokens, r.sampling, r.stop_token_ids, r.stop_strings,
                r.seed)
        req = self._make_request(prompt, max_new_tokens, sampling, stop_token_ids,
                                 stop_strings, seed)
        self._validate(req)
        rid = self._next_id
        self._next_id += 1
        arrival = time.perf_counter() if arrival_time is None else float(arrival_time)
        state = _State(rid, req, frozenset(req.stop_token_ids), arrival)
        if req.max_new_tokens == 0:
            self._retire(state, "length")
        else:
            self._states[rid] = state
            self._waiting.append(state)
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop an unfinished request and free its blocks; False if it is not unfinished."""
        state = self._states.get(rid)
        if state is None:
            return False
        if self._ahead is not None and any(s is state for s in self._ahead.states):
            ahead, self._ahead = self._ahead, None
            self._pending += self._collect(ahead)  # the next step returns them
            if state.rid not in self._states:  # it finished in that burst
                return False
        if state in self._running:
            self._running.remove(state)
        else:
            self._waiting.remove(state)
        self._retire(state, "cancelled")
        return True

    def has_unfinished(self) -> bool:
        return bool(self._states) or bool(self._pending)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ blocks
    def _available(self) -> int:
        """Blocks a reservation can get: free ones plus unused cached ones."""
        free = self.allocator.num_free
        return free + self.prefix_cache.tree.evictable_blocks if self.prefix_cache else free

    def _reserve(self, state: _State, n: int) -> None:
        """Reserve ``n`` more slots for ``state`` (evicting unused cached blocks)."""
        if self.prefix_cache is not None:
            copies = self.prefix_cache.append_tokens(state.rid, n)
        else:
            copies = self.allocator.append_tokens(state.rid, n)
        assert not copies, "only full blocks are ever shared"

    def _admit(self, state: _State) -> bool:
        """Reserve ``state``'s whole sequence, sharing its cached prefix; False if the
        pool cannot hold it next to a block per running request."""
        whole = -(-state.length // self.block_size)
        if whole + len(self._running) > self._available():
            return False
        if self.prefix_cache is None:
            self.allocator.allocate_sequence(state.rid, state.length)
            state.computed = 0
        else:
            try:
                reused, _ = self.prefix_cache.lookup(state.rid, state.tokens)
            except OutOfBlocksError:
                return False
            state.computed = len(reused) * self.block_size
            state.cached += state.computed
        state.admitted = state.prefilling = True
        if state.swapped:
            self._swap_in(state)
        return True

    def _pool_view(self) -> PagedCache:
        """The pool as a ``PagedCache`` (for the host pool's copies; no tables)."""
        return PagedCache(k_pages=self._k, v_pages=self._v,
                          block_tables=jnp.zeros((1, 1), jnp.int32),
                          lengths=jnp.zeros((1,), jnp.int32))

    def _swap_out(self, state: _State) -> None:
        """Copy the pages holding ``state``'s computed tokens to host slots (before its
        blocks are freed); nothing if the host pool has too few free (it recomputes)."""
        pool = self.host_pool
        n = -(-state.computed // self.block_size)
        if pool is None or n == 0 or n > pool.num_free:
            return
        slots = pool.allocate(n)
        pool.save_pages(self._pool_view(), self.allocator.block_table(state.rid)[:n], slots)
        state.swap_slots, state.swapped = slots, state.computed
        self.swapped_out_blocks += n

    def _swap_in(self, state: _State) -> None:
        """At re-admission: copy the swapped pages the prefix cache did not already
        share back into ``state``'s fresh blocks; its computed tokens resume there."""
        assert self.host_pool is not None
        first = state.computed // self.block_size  # pages the prefix cache shared
        if state.swapped > state.computed:
            n = len(state.swap_slots)
            table = self.allocator.block_table(state.rid)
            pages = self.host_pool.restore_pages(self._pool_view(), state.swap_slots[first:],
                                                 table[first:n])
            self._k, self._v = pages.k_pages, pages.v_pages
            self.swapped_in_blocks += n - first
            state.computed = state.swapped
        self._drop_swap(state)

    def _drop_swap(self, state: _State) -> None:
        """Free ``state``'s host slots, if it holds any."""
        if state.swap_slots:
            assert self.host_pool is not None
            self.host_pool.free(state.swap_slots)
        state.swap_slots, state.swapped = [], 0

    def _release(self, state: _State) -> None:
        """Give back ``state``'s blocks, caching its computed full blocks first."""
        if not state.admitted:
            return
        if self.prefix_cache is not None:
            self._commit(state)
            self.prefix_cache.release(state.rid)
        else:
            self.allocator.free_sequence(state.rid)
        state.admitted = False

    def _commit(self, state: _State) -> None:
        if self.prefix_cache is not None and state.computed >= self.block_size:
            self.prefix_cache.commit(state.rid, state.span(0, state.computed))

    def _retire(self, state: _State, reason: str) -> None:
        self._release(state)
        self._drop_swap(state)
        self._states.pop(state.rid, None)
        now = time.perf_counter()
        times = state.token_times
        self.finished[state.rid] = GenerationOutput([list(state.output)], [reason])
        self.request_metrics[state.rid] = RequestMetrics(
            prompt_tokens=len(state.request.prompt), output_tokens=len(state.output),
            ttft_s=times[0] - state.arrival if times else None,
            itl_s=tuple(float(b - a) for a, b in itertools.pairwise(times)),
            e2e_s=now - state.arrival, preemptions=state.preemptions,
            cached_tokens=state.cached, finish_reason=reason)

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, state: _State) -> None:
        """Free the blocks (swapping the computed K/V out first with
        ``preemption="swap"``), back to the front of the queue."""
        self._running.remove(state)
        if self.preemption == "swap":
            self._swap_out(state)
        self._release(state)
        state.computed = 0
        state.preemptions += 1
        self._waiting.appendleft(state)

    def _chunk(self, todo: int, left: int, chunk_rows: int) -> int:
        """Tokens a request with ``todo`` tokens to compute gets this step, ``left`` of
        the budget and ``chunk_rows`` multi-token rows being planned already."""
        if todo == 1:
            return 1
        if chunk_rows >= self.max_chunk_rows:
            return 0
        return min(self.prefill_chunk, todo, left)

    def _schedule(self) -> tuple[list[tuple[_State, int]], int, int, int]:
        """Plan and reserve this step; return (rows with their token counts, preempted,
        admitted, tokens the admitted requests took from the prefix cache)."""
        # Decodes first: the budget (>= max_batch) covers all of them; then chunks.
        left = self.max_tokens_per_step - sum(
            1 for s in self._running if s.length - s.computed == 1)
        chunk_rows = 0
        plan: dict[_State, int] = {}
        for s in self._running:
            todo = s.length - s.computed
            plan[s] = self._chunk(todo, left, chunk_rows)
            if todo > 1:
                left -= plan[s]
                chunk_rows += plan[s] > 1
        preempted = 0
        i = 0
        while i < len(self._running):
            state = self._running[i]
            need = max(0, state.computed + plan[state] - self.allocator.num_tokens(state.rid))
            while self.allocator.blocks_to_append(state.rid, need) > self._available():
                victim = self._running[-1]
                self._preempt(victim)
                del plan[victim]
                preempted += 1
                if victim is state:
                    break
            else:
                self._reserve(state, need)
                i += 1
        admitted = cached = 0
        while (not preempted and self._waiting and len(self._running) < self.max_batch
               and left > 0 and chunk_rows < self.max_chunk_rows):
            state = self._waiting[0]
            before = state.cached
            if not self._admit(state):
                break
            self._waiting.popleft()
            self._running.append(state)
            plan[state] = self._chunk(state.length - state.computed, left, chunk_rows)
            left -= plan[state]
            chunk_rows += plan[state] > 1
            admitted += 1
            cached += state.cached - before
        rows = [(s, plan[s]) for s in self._running if plan[s] > 0]
        return rows, preempted, admitted, cached

    # ------------------------------------------------------------------ stepping
    def _table_width(self, blocks: int) -> int:
        return max(blocks, min(self._max_table, pow2(max(8, blocks))))

    @property
    def chunk_width(self) -> int:
        """``W`` of the chunk forward's ``[R, W]`` slot array."""
        return min(self.prefill_chunk, self.max_tokens_per_step)

    @property
    def max_chunk_rows(self) -> int:
        """Most multi-token rows in one step: their ``[R, W]`` forward computes at most
        ``max_tokens_per_step`` slots, padding included."""
        return min(self.max_batch, self.max_tokens_per_step // self.chunk_width)

    def _decode_rows(self, n: int) -> int:
        """Rows of the decode slot array for ``n`` one-token rows (module docstring)."""
        return min(self.max_batch, max(MIN_DECODE_ROWS, pow2(n)))

    def _run(self, tokens: np.ndarray, positions: np.ndarray, tables: np.ndarray,
             logit_index: np.ndarray, lengths: np.ndarray, seeds: np.ndarray,
             draws: np.ndarray, params: list[SamplingParams]) -> jax.Array:
        """Dispatch one forward (the pool donated and replaced); return the sampled ids
        int32 [rows], not waited for. Arrays as in ``_engine_step``."""
        sp, all_greedy = self._sampling(params)
        nxt, self._k, self._v = _engine_step(
            self.model, self.params, self._k, self._v, tokens, positions, tables, lengths,
            logit_index, sp, seeds, draws, attention=self.attention, all_greedy=all_greedy)
        return nxt

    def _sampling(self, params: list[SamplingParams]) -> tuple[SamplingArrays, bool]:
        """The rows' sampling arrays and whether every row is greedy (then the values are
        not read, and one device copy per row count is reused)."""
        if not all(p.greedy for p in params):
            return SamplingArrays.from_params(params), False
        if len(params) not in self._greedy:
            self._greedy[len(params)] = SamplingArrays.from_params(params)
        return self._greedy[len(params)], True

    def _tables(self, states: list[_State], num_rows: int) -> np.ndarray:
        """Block tables int32 [num_rows, table width] of ``states`` (-1 padded)."""
        width = self._table_width(max(len(self.allocator.block_table(s.rid)) for s in states))
        tables = np.full((num_rows, width), -1, np.int32)
        tables[: len(states)] = self.allocator.block_tables_array([s.rid for s in states],
                                                                  width, pad=-1)
        return tables

    def _forward(self, rows: list[tuple[_State, int]], num_rows: int,
                 width: int) -> tuple[jax.Array, Shape]:
        """Dispatch one forward over ``rows`` in a ``[num_rows, width]`` slot array;
        return the sampled ids (int32 [num_rows], not waited for) and the shape."""
        tables = self._tables([s for s, _ in rows], num_rows)
        tokens = np.zeros((num_rows, width), np.int32)
        positions = np.full((num_rows, width), -1, np.int32)
        logit_index = np.zeros((num_rows,), np.int32)
        lengths = np.zeros((num_rows,), np.int32)
        seeds = np.zeros((num_rows,), np.uint32)
        draws = np.zeros((num_rows,), np.int32)
        params = [GREEDY] * num_rows
        for row, (s, c) in enumerate(rows):
            tokens[row, :c] = s.span(s.computed, s.computed + c)
            positions[row, :c] = np.arange(s.computed, s.computed + c)
            logit_index[row] = c - 1
            lengths[row] = s.computed
            seeds[row] = s.request.seed
            draws[row] = len(s.output)
            params[row] = s.request.sampling
        nxt = self._run(tokens, positions, tables, logit_index, lengths, seeds, draws, params)
        return nxt, (num_rows, width, tables.shape[1])

    def step_shapes(self, max_tokens: int | None = None) -> list[Shape]:
        """Every ``(rows, width, table width)`` a step can run for requests of at most
        ``max_tokens`` tokens (prompt + new; default the model's context)."""
        limit = self.model.cfg.max_position_embeddings if max_tokens is None else max_tokens
        _check_count("max_tokens", limit)
        tables = sorted({self._table_width(b)
                         for b in range(1, -(-limit // self.block_size) + 1)})
        rows = sorted({min(self.max_batch, pow2(n))
                       for n in range(1, self.max_chunk_rows + 1)})
        decode = sorted({self._decode_rows(n) for n in range(1, self.max_batch + 1)})
        return [(r, 1, t) for r in decode for t in tables] + [
            (r, self.chunk_width, t) for r in rows for t in tables]

    def precompile(self, max_tokens: int | None = None, *, sampled: bool = False) -> int:
        """Compile every step shape (``step_shapes``) before serving, greedy and, with
        ``sampled``, sampling variants, by running each over empty slots (position -1:
        nothing is written or read). Returns the number of shapes; waits for them."""
        variants = [GREEDY, SamplingParams(temperature=1.0)] if sampled else [GREEDY]
        shapes = self.step_shapes(max_tokens)
        for rows, width, table_width in shapes:
            for sp in variants:
                zeros = np.zeros((rows,), np.int32)
                tables = np.full((rows, table_width), -1, np.int32)
                self._run(np.zeros((rows, width), np.int32),
                          np.full((rows, width), -1, np.int32), tables, zeros, zeros,
                          zeros.astype(np.uint32), zeros, [sp] * rows)
                if self.decode_steps > 1 and width == 1:  # the burst over the same rows
                    ids = self._run_burst(zeros, zeros, zeros, tables, zeros.astype(np.uint32),
                                          zeros, [sp] * rows)
                    if self.overlap_bursts:  # the next burst's tokens, picked on device
                        self._run_burst(_last_ids(ids, jnp.asarray(zeros)), zeros, zeros,
                                        tables, zeros.astype(np.uint32), zeros, [sp] * rows)
        jax.block_until_ready(self._k)
        return len(shapes)

    def _stopped(self, state: _State, token: int) -> bool:
        if token in state.stops:
            return True
        if state.request.stop_strings and self.detokenize is not None:
            text = self.detokenize(state.output)
            return any(s in text for s in state.request.stop_strings)
        return False

    def step(self) -> list[Event]:
        """Schedule, run the forwards, sample; return the new tokens (with
        ``overlap_bursts``, first those of the burst in flight, if one is)."""
        t0 = time.perf_counter()
        events, self._pending = self._pending, []
        if self._ahead is not None:
            return events + self._step_ahead(t0)
        return events + self._step(t0)

    def _step_ahead(self, t0: float) -> list[Event]:
        """Read the burst in flight, dispatching the next one first when it can run."""
        burst, self._ahead = self._ahead, None
        assert burst is not None
        running = len(self._running)
        events = self._read(burst)
        self._record_burst(t0, running, burst, events)
        return events

    def _record_burst(self, t0: float, running: int, burst: _Burst, events: list[Event],
                      *, cached: int = 0, preempted: int = 0, admitted: int = 0) -> None:
        """The step metrics of a step that ran ``burst`` and produced ``events``."""
        self.step_metrics.append(StepMetrics(
            rows=running, max_batch=self.max_batch, waiting=len(self._waiting),
            prefill_tokens=0, decode_tokens=len(events), cached_tokens=cached,
            shapes=((burst.tables.shape[0], 1, burst.tables.shape[1]),),
            new_tokens=len(events), preempted=preempted, admitted=admitted, start=t0,
            duration_s=time.perf_counter() - t0, decode_steps=self.decode_steps))

    def _step(self, t0: float) -> list[Event]:
        """One scheduled step (no burst in flight)."""
        rows, preempted, admitted, cached = self._schedule()
        if not rows:
            return []
        running = len(self._running)
        decode_rows = [(s, c) for s, c in rows if c == 1]
        chunk_rows = [(s, c) for s, c in rows if c > 1]
        if (self.decode_steps > 1 and not chunk_rows and not self._waiting
                and all(not s.prefilling for s, _ in rows)):
            done = self._burst([s for s, _ in decode_rows])
            if done is not None:
                new_tokens, burst = done
                self._record_burst(t0, running, burst, new_tokens, cached=cached,
                                   preempted=preempted, admitted=admitted)
                return new_tokens
        calls: list[tuple[list[tuple[_State, int]], jax.Array]] = []
        shapes: list[Shape] = []
        if decode_rows:
            nxt, shape = self._forward(decode_rows, self._decode_rows(len(decode_rows)), 1)
            calls.append((decode_rows, nxt))
            shapes.append(shape)
        if chunk_rows:
            nxt, shape = self._forward(chunk_rows, min(self.max_batch, pow2(len(chunk_rows))),
                                       self.chunk_width)
            calls.append((chunk_rows, nxt))
            shapes.append(shape)
        prefill = decode = 0
        events: list[Event] = []
        for group, nxt in calls:
            sampled = np.asarray(nxt)
            now = time.perf_counter()
            for row, (s, c) in enumerate(group):
                if c == 1 and s.output and s.computed == s.length - 1:
                    decode += 1
                else:
                    prefill += c
                s.computed += c
                if s.computed < s.length:
                    continue  # still prefilling
                if s.prefilling:
                    s.prefilling = False
                    self._commit(s)  # its prompt's full blocks, for later requests
                self._accept(s, int(sampled[row]), now, events)
        self.step_metrics.append(StepMetrics(
            rows=running,
            max_batch=self.max_batch, waiting=len(self._waiting), prefill_tokens=prefill,
            decode_tokens=decode, cached_tokens=cached, shapes=tuple(shapes),
            new_tokens=len(events), preempted=preempted, admitted=admitted, start=t0,
            duration_s=time.perf_counter() - t0))
        return events

    def _accept(self, s: _State, token: int, now: float, events: list[Event]) -> bool:
        """Append a sampled token to ``s`` and to ``events``; retire ``s`` if the token
        stops it or reaches its ``max_new_tokens``. Returns whether ``s`` retired."""
        s.output.append(token)
        s.token_times.append(now)
        events.append((s.rid, token))
        stop = self._stopped(s, token)
        if stop or len(s.output) >= s.request.max_new_tokens:
            self._running.remove(s)
            self._retire(s, "stop" if stop else "length")
            return True
        return False

    def _burst(self, states: list[_State]) -> tuple[list[Event], _Burst] | None:
        """Run ``decode_steps`` decode forwards over ``states`` (each already holds its
        next slot) in one device loop; return the new tokens and the burst, or None
        (nothing done) if the pool cannot hold the extra slots. Rows stop at their
        ``max_new_tokens``; a stop id or string ends a row on the host, and the tokens
        computed after it are dropped. With ``overlap_bursts`` the next burst may be
        dispatched before this one is read (``_speculate``)."""
        active = [min(self.decode_steps, s.request.max_new_tokens - len(s.output))
                  for s in states]
        if not self._reserve_burst(states, [s.computed for s in states], active):
            return None
        rows = self._decode_rows(len(states))
        tokens = np.zeros((rows,), np.int32)
        tokens[: len(states)] = [s.output[-1] for s in states]
        burst = self._dispatch_burst(states, active, tokens,
                                     [s.computed for s in states],
                                     [len(s.output) for s in states])
        return self._read(burst), burst

    def _reserve_burst(self, states: list[_State], starts: list[int], active: list[int]
                       ) -> bool:
        """Reserve slots ``[starts[i], starts[i] + active[i])`` for each of ``states``;
        False (nothing reserved) if the pool cannot hold them."""
        more = [max(0, start + n - self.allocator.num_tokens(s.rid))
                for s, start, n in zip(states, starts, active, strict=True)]
        if sum(self.allocator.blocks_to_append(s.rid, m)
               for s, m in zip(states, more, strict=True)) > self._available():
            return False
        for s, m in zip(states, more, strict=True):
            self._reserve(s, m)
        return True

    def _dispatch_burst(self, states: list[_State], active: list[int], tokens: ArrayLike,
                        starts: list[int], draws: list[int]) -> _Burst:
        """Dispatch a burst: row ``i`` feeds ``tokens[i]`` (int32 [rows], host or device)
        at position ``starts[i]`` and computes ``active[i]`` tokens from draw ``draws[i]``
        on; slots already reserved."""
        rows = self._decode_rows(len(states))
        tables = self._tables(states, rows)
        positions, act, draw = (np.zeros((rows,), np.int32) for _ in range(3))
        seeds = np.zeros((rows,), np.uint32)
        params = [GREEDY] * rows
        for row, s in enumerate(states):
            positions[row], act[row], draw[row] = starts[row], active[row], draws[row]
            seeds[row], params[row] = s.request.seed, s.request.sampling
        ids = self._run_burst(tokens, positions, act, tables, seeds, draw, params)
        return _Burst(states, active, ids, tables)

    def _speculate(self, prev: _Burst) -> _Burst | None:
        """With ``overlap_bursts``: dispatch the burst after ``prev`` (not yet read) when
        nothing waits to be admitted and every row of ``prev`` is still running. Rows
        continue by ``max_new_tokens``, known in advance; a row that a stop id or
        string ends within ``prev`` gets its tokens in this burst dropped when it is
        read (``_collect``). Its input tokens are ``prev``'s last ids, picked on the
        device. None if it cannot run (or nothing is left to compute)."""
        states = prev.states
        if (not self.overlap_bursts or self._waiting
                or any(s.rid not in self._states for s in states)):
            return None  # (a row retired before prev was read: re-plan the rows)
        sampled = [len(s.output) + n for s, n in zip(states, prev.active, strict=True)]
        active = [min(self.decode_steps, s.request.max_new_tokens - k)
                  for s, k in zip(states, sampled, strict=True)]
        starts = [s.computed + n for s, n in zip(states, prev.active, strict=True)]
        if not any(active) or not self._reserve_burst(states, starts, active):
            return None
        prev_active = np.zeros((prev.tables.shape[0],), np.int32)
        prev_active[: len(states)] = prev.active
        tokens = _last_ids(prev.ids, jnp.asarray(prev_active))
        self.overlapped_bursts += 1
        return self._dispatch_burst(states, active, tokens, starts, sampled)

    def _read(self, burst: _Burst) -> list[Event]:
        """Read a dispatched ``burst``, dispatching the one after it first when it can
        run (``_speculate``); that one is forgotten if every one of its rows retired in
        ``burst`` (a stop): nothing of it would be kept."""
        self._ahead = self._speculate(burst)
        events = self._collect(burst)
        if self._ahead is not None and all(s.rid not in self._states
                                           for s in self._ahead.states):
            self._ahead = None
            self.discarded_bursts += 1
        return events

    def _collect(self, burst: _Burst) -> list[Event]:
        """Wait for ``burst``'s ids and book them: each row's tokens are accepted in order
        until it retires (stop or length); the rest of its row is dropped, and so is
        the row of a request that retired while the burst was in flight."""
        ids = np.asarray(burst.ids)
        now = time.perf_counter()
        events: list[Event] = []
        for row, (s, n) in enumerate(zip(burst.states, burst.active, strict=True)):
            if s.rid not in self._states:  # stopped in the burst before this one
                continue
            for j in range(n):
                s.computed += 1
                if self._accept(s, int(ids[row, j]), now, events):
                    break
        return events

    def _run_burst(self, tokens: ArrayLike, positions: np.ndarray, active: np.ndarray,
                   tables: np.ndarray, seeds: np.ndarray, draws: np.ndarray,
                   params: list[SamplingParams]) -> jax.Array:
        """Dispatch ``_engine_decode_burst`` (the pool donated and replaced)."""
        sp, all_greedy = self._sampling(params)
        ids, self._k, self._v = _engine_decode_burst(
            self.model, self.params, self._k, self._v, tokens, positions, active, tables, sp,
            seeds, draws, steps=self.decode_steps, attention=self.attention,
            all_greedy=all_greedy, fused=self.fused_launch)
        return ids

    def stream(self, on_token: Callable[[int, int], None] | None = None) -> Iterator[Event]:
        """Step until nothing is unfinished, yielding each ``(request_id, token)``.

        Requests may be added or cancelled between yields; ``on_token`` is called too.
        """
        while self.has_unfinished():
            for event in self.step():
                if on_token is not None:
                    on_token(*event)
                yield event

    def generate(self, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int | Sequence[int],
                 sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
                 stop_token_ids: Sequence[int] = (), stop_strings: str | Sequence[str] = (),
                 seed: int = 0, on_token: Callable[[int, int], None] | None = None
                 ) -> GenerationOutput:
        """Add every prompt (validated first: nothing is queued if one is bad), run to the
        end, return their outputs in order. Request ``i`` uses seed ``seed + i``."""
        n = len(prompts)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        samp = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        if len(limits) != n or len(samp) != n:
            raise ValueError("per-prompt max_new_tokens and sampling need one entry per prompt")
        requests = []
        for i, (p, m, s) in enumerate(zip(prompts, limits, samp, strict=True)):
            try:
                req = self._make_request(p, m, s, stop_token_ids, stop_strings, seed + i)
                self._validate(req)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            requests.append(req)
        rids = [self.add_request(r) for r in requests]
        for _ in self.stream(on_token):
            pass
        outs = [self.finished[r] for r in rids]
        return GenerationOutput([o.tokens[0] for o in outs],
                                [o.finish_reasons[0] for o in outs])

    # ------------------------------------------------------------------ metrics
    def pool_stats(self) -> AllocatorStats:
        return self.allocator.stats()

    def swap_stats(self) -> HostPoolStats | None:
        """Bytes and seconds of the swap copies (None without ``preemption="swap"``)."""
        return None if self.host_pool is None else self.host_pool.stats

    def metrics(self) -> EngineMetrics:
        steps = self.step_metrics
        busy = sum(s.duration_s for s in steps)
        gen = sum(s.new_tokens for s in steps)
        reqs = list(self.request_metrics.values())
        ttfts = [r.ttft_s for r in reqs if r.ttft_s is not None]
        itls = [x for r in reqs for x in r.itl_s]
        stats = self.prefix_cache.stats() if self.prefix_cache is not None else None
        return EngineMetrics(
            steps=len(steps), generated_tokens=gen, busy_s=busy,
            tokens_per_s=gen / busy if busy > 0 else 0.0,
            mean_occupancy=float(np.mean([s.occupancy for s in steps])) if steps else 0.0,
            preemptions=sum(s.preempted for s in steps),
            ttft_p50_s=_percentile(ttfts, 50), ttft_p99_s=_percentile(ttfts, 99),
            itl_p50_s=_percentile(itls, 50), itl_p99_s=_percentile(itls, 99),
            prefix_lookup_tokens=stats.lookup_tokens if stats else 0,
            prefix_hit_tokens=stats.hit_tokens if stats else 0,
            swapped_out_blocks=self.swapped_out_blocks, swapped_in_blocks=self.swapped_in_blocks,
            swap_gbps_to_host=self.host_pool.stats.gbps_to_host if self.host_pool else 0.0,
            swap_gbps_to_device=self.host_pool.stats.gbps_to_device if self.host_pool else 0.0)
