"""Batched autoregressive generation over any cache layout.

Prompts of different lengths share one batch: they are right-padded, each keeps its
own positions, and padding has position -1 so it is never stored or attended to.
With the ``dense``, ``paged`` and ``none`` caches the whole decode loop is one jitted
``lax.while_loop`` on device (no host round-trip per token); it stops as soon as every
sequence has hit a stop token or its ``max_new_tokens``. The ``concat`` cache changes
shape every step, so it runs a Python loop over a jitted step that recompiles for
each length — the cost it exists to show.

The ``paged`` cache is driven by a host-side ``BlockAllocator``: each sequence's blocks
for its whole budget (prompt + max_new_tokens) are reserved before the loop starts, so
the device loop never needs the host. ``generate_forked`` prefills one prompt once and
forks it into several samples that share the prompt's pages (copy-on-write), the
memory model of parallel sampling in PagedAttention.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis import sizing
from kvjax.analysis.spec import ArchSpec
from kvjax.cache import (
    ConcatCache,
    DenseCache,
    LatentCache,
    NoCache,
    PagedCache,
    PagedLatentCache,
)
from kvjax.cache.paged import (
    KERNEL_HEAD_DIMS,
    KERNEL_PAGE_SIZES,
    check_attention_backend,
    copy_pages,
    triton_unavailable_reason,
    with_block_tables,
)
from kvjax.cache.paged_latent import check_latent_backend
from kvjax.config import ModelConfig
from kvjax.engine.sampling import GREEDY, SamplingArrays, SamplingParams, sample
from kvjax.engine.shapes import round_up, table_width
from kvjax.memory.allocator import AllocatorStats, BlockAllocator
from kvjax.mla_config import MLAConfig
from kvjax.models.llama import Decoder
from kvjax.models.mla import MLADecoder
from pallas_kernels.triton_launch import triton_launcher

logger = logging.getLogger(__name__)

CacheKind = Literal["none", "concat", "dense", "paged"]
CACHE_KINDS: tuple[CacheKind, ...] = ("none", "concat", "dense", "paged")
# The decoders the cached and uncached device loops run; "paged" and "concat" hold
# per-head K/V and run only ``Decoder`` (MLA's "dense" cache is its latent cache).
Model = Decoder | MLADecoder


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """Generated ids per prompt (stop token included) and why each sequence ended."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (hit a stop id) or "length" (max_new_tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
    """Loop state of the device-side decode loop. B = batch, N = steps."""

    step: jax.Array  # int32 [], tokens produced so far by the longest sequence
    last: jax.Array  # int32 [B], last token of each sequence
    lengths: jax.Array  # int32 [B], tokens in each sequence (prompt + generated)
    out: jax.Array  # int32 [B, N], generated ids, -1 where none
    done: jax.Array  # bool [B]
    cache: Any  # the cache pytree (or the token buffer for the no-cache loop)


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def sample_keys(seed: int, indices: Sequence[int]) -> jax.Array:
    """Per-sequence PRNG keys [n]: ``fold_in(key(seed), i)`` for each ``i`` in ``indices``.

    ``generate_forked`` gives sample ``i`` the key ``sample_keys(seed, [i])[0]``; passing
    ``keys=sample_keys(seed, [i])`` to ``generate`` reproduces that sample alone.
    """
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def _draw(logits: jax.Array, key: jax.Array, step: jax.Array, sp: SamplingArrays,
          all_greedy: bool) -> jax.Array:
    """Next token per sequence, logits [B, V] -> int32 [B].

    ``key`` is either one key [] for the batch (row draws depend on the batch) or one
    key per row [B] (row ``b`` draws only from ``key[b]``, whatever the batch holds).
    """
    if key.ndim == 0:
        return sample(logits, jax.random.fold_in(key, step), sp, all_greedy=all_greedy)

    def one(row: jax.Array, k: jax.Array, p: SamplingArrays) -> jax.Array:
        p1 = jax.tree.map(lambda a: a[None], p)
        return sample(row[None], jax.random.fold_in(k, step), p1, all_greedy=all_greedy)[0]

    return jax.vmap(one)(logits, key, sp)


def _record(state_out: jax.Array, step: jax.Array, token: jax.Array, done: jax.Array,
            max_new: jax.Array, stop_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write ``token`` [B] at column ``step`` for live sequences; return (out, new done)."""
    live = ~done
    out = state_out.at[:, step].set(jnp.where(live, token, -1))
    hit_stop = (token[:, None] == stop_ids).any(axis=-1)
    done = done | (live & (hit_stop | (step + 1 >= max_new)))
    return out, done


def _right_padded(prompts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    return tokens, lengths


def _positions(width: int, lengths: jax.Array) -> jax.Array:
    t = jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(t < lengths[:, None], t, -1)


def _decode_loop(model: Model, params: Any, logits: jax.Array, lengths: jax.Array,
                 max_new: jax.Array, stop_ids: jax.Array, sp: SamplingArrays, key: jax.Array,
                 cache: Any, *, num_steps: int, all_greedy: bool) -> tuple[jax.Array, Any]:
    """The device decode loop shared by every preallocated cache (dense, paged, forked).

    ``logits`` [B, V] are those at each prompt's last token, ``lengths`` [B] the tokens
    already in ``cache``; ``key`` is one key [] or one per sequence [B] (see ``_draw``).
    Returns the generated ids int32 [B, num_steps] (-1 after a sequence ended) and the
    final cache. Returning the cache lets a donated input cache alias the loop state, so
    the loop updates it in place instead of copying it.
    """
    batch = lengths.shape[0]
    first = _draw(logits, key, jnp.int32(0), sp, all_greedy)
    done0 = max_new <= 0
    out, done = _record(jnp.full((batch, num_steps), -1, jnp.int32), jnp.int32(0), first,
                        done0, max_new, stop_ids)
    state = _DecodeState(step=jnp.int32(1), last=first, lengths=lengths, out=out,
                         done=done, cache=cache)

    def cond(s: _DecodeState) -> jax.Array:
        return (s.step < num_steps) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        pos = jnp.where(s.done, -1, s.lengths)[:, None]
        logits, cache = model.apply({"params": params}, s.last[:, None], pos, s.cache,
                                    logit_index=jnp.zeros((batch,), jnp.int32))
        nxt = _draw(logits, key, s.step, sp, all_greedy)
        out, done = _record(s.out, s.step, nxt, s.done, max_new, stop_ids)
        return _DecodeState(step=s.step + 1, last=jnp.where(s.done, s.last, nxt),
                            lengths=s.lengths + (~s.done).astype(jnp.int32), out=out,
                            done=done, cache=cache)

    final = jax.lax.while_loop(cond, body, state)
    return final.out, final.cache


_decode = jax.jit(_decode_loop, static_argnames=("model", "num_steps", "all_greedy"),
                  donate_argnames=("cache",))
_copy_pages = jax.jit(copy_pages, donate_argnums=(0,))


@partial(jax.jit, static_argnames=("model", "num_steps", "all_greedy"),
         donate_argnames=("cache",))
def _generate_cached(model: Model, params: Any, tokens: jax.Array, lengths: jax.Array,
                     max_new: jax.Array, stop_ids: jax.Array, sp: SamplingArrays,
                     key: jax.Array, cache: Any, *, num_steps: int,
                     all_greedy: bool) -> tuple[jax.Array, Any]:
    """Prefill the right-padded ``tokens`` [B, W] into the empty ``cache``, then decode.

    Returns (ids int32 [B, num_steps], final cache); see ``_decode_loop``.
    """
    logits, cache = model.apply({"params": params}, tokens, _positions(tokens.shape[1], lengths),
                                cache, logit_index=lengths - 1)
    return _decode_loop(model, params, logits, lengths, max_new, stop_ids, sp, key, cache,
                        num_steps=num_steps, all_greedy=all_greedy)


@partial(jax.jit, static_argnames=("model", "num_steps", "all_greedy"))
def _generate_uncached(model: Model, params: Any, tokens: jax.Array, lengths: jax.Array,
                       max_new: jax.Array, stop_ids: jax.Array, sp: SamplingArrays,
                       key: jax.Array, *, num_steps: int, all_greedy: bool) -> jax.Array:
    """Every step runs the model over the whole (prompt + generated) sequence."""
    batch, width = tokens.shape
    state = _DecodeState(step=jnp.int32(0), last=jnp.zeros((batch,), jnp.int32),
                         lengths=lengths, out=jnp.full((batch, num_steps), -1, jnp.int32),
                         done=max_new <= 0, cache=tokens)

    def cond(s: _DecodeState) -> jax.Array:
        return (s.step < num_steps) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        buf = s.cache
        logits, _ = model.apply({"params": params}, buf, _positions(width, s.lengths),
                                NoCache(), logit_index=s.lengths - 1)
        nxt = _draw(logits, key, s.step, sp, all_greedy)
        out, done = _record(s.out, s.step, nxt, s.done, max_new, stop_ids)
        live = ~s.done
        slot = jnp.where(live, s.lengths, width)  # finished sequences write nothing
        buf = buf.at[jnp.arange(batch), slot].set(nxt, mode="drop")
        return _DecodeState(step=s.step + 1, last=nxt, lengths=s.lengths + live.astype(jnp.int32),
                            out=out, done=done, cache=buf)

    return jax.lax.while_loop(cond, body, state).out


def _step(model: Model, params: Any, tokens: jax.Array, positions: jax.Array,
          cache: Any, logit_index: jax.Array) -> tuple[jax.Array, Any]:
    """One model step: logits [B, V] at ``logit_index`` and the new cache."""
    return model.apply({"params": params}, tokens, positions, cache, logit_index=logit_index)


# The jitted step with the cache donated, so fixed-shape caches update in place.
forward_step = jax.jit(_step, static_argnames=("model",), donate_argnames=("cache",))
# The concat cache returns larger arrays each step: there is nothing to donate into.
_grow_step = jax.jit(_step, static_argnames=("model",))


@partial(jax.jit, static_argnames=("all_greedy",))
def _sample_and_record(logits: jax.Array, key: jax.Array, step: jax.Array, sp: SamplingArrays,
                       out: jax.Array, done: jax.Array, max_new: jax.Array,
                       stop_ids: jax.Array, *, all_greedy: bool
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    nxt = _draw(logits, key, step, sp, all_greedy)
    out, new_done = _record(out, step, nxt, done, max_new, stop_ids)
    return nxt, out, new_done


def _generate_concat(model: Decoder, params: Any, tokens: jax.Array, lengths: jax.Array,
                     max_new: jax.Array, stop_ids: jax.Array, sp: SamplingArrays,
                     key: jax.Array, *, num_steps: int, all_greedy: bool) -> jax.Array:
    cfg = model.cfg
    batch, width = tokens.shape
    cache = ConcatCache.init(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    logits, cache = _grow_step(model, params, tokens, _positions(width, lengths), cache,
                                 lengths - 1)
    out = jnp.full((batch, num_steps), -1, jnp.int32)
    done = max_new <= 0
    for step in range(num_steps):
        live = ~done
        nxt, out, done = _sample_and_record(logits, key, jnp.int32(step), sp, out, done,
                                            max_new, stop_ids, all_greedy=all_greedy)
        if step + 1 == num_steps or bool(jnp.all(done)):
            break
        pos = jnp.where(live, lengths, -1)[:, None]
        lengths = lengths + live.astype(jnp.int32)
        logits, cache = _grow_step(model, params, nxt[:, None], pos, cache,
                                     jnp.zeros((batch,), jnp.int32))
    return out


def validate_prompts(cfg: ModelConfig | MLAConfig, prompts: Sequence[Sequence[int]],
                     max_new_tokens: Sequence[int]) -> None:
    """Raise ValueError naming the first bad prompt, token or length."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, (prompt, n) in enumerate(zip(prompts, max_new_tokens, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if n < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {n} for prompt {i}")
        if len(prompt) + n > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(prompt)} prompt + {n} new tokens exceed the "
                             f"model's context of {cfg.max_position_embeddings}")


def _stop_array(stop_token_ids: Sequence[int] | Sequence[Sequence[int]],
                b: int) -> tuple[list[list[int]], np.ndarray]:
    """Per-sequence stop lists and their -1-padded int32 [B, S] array."""
    per_seq: list[list[int]]
    if stop_token_ids and not isinstance(stop_token_ids[0], int):
        per_seq = [[int(t) for t in s] for s in stop_token_ids]  # type: ignore[union-attr]
    else:
        per_seq = [[int(t) for t in stop_token_ids]] * b  # type: ignore[arg-type]
    if len(per_seq) != b:
        raise ValueError("per-prompt stop_token_ids must have one list per prompt")
    stops = np.full((b, max(1, *(len(s) for s in per_seq))), -1, np.int32)
    for i, s in enumerate(per_seq):
        stops[i, : len(s)] = s
    return per_seq, stops


def _to_output(out: jax.Array, per_seq_stops: list[list[int]]) -> GenerationOutput:
    out_np = np.asarray(out)
    result, reasons = [], []
    for i, stops in enumerate(per_seq_stops):
        row = [int(t) for t in out_np[i] if t >= 0]
        result.append(row)
        reasons.append("stop" if row and row[-1] in stops else "length")
    return GenerationOutput(tokens=result, finish_reasons=reasons)


def _dense_cache(model: Model, batch: int, max_len: int) -> DenseCache | LatentCache:
    """The empty preallocated cache of ``model``: per-head K/V, or MLA latent rows."""
    if isinstance(model, MLADecoder):
        mla = model.cfg
        return LatentCache.init(mla.num_layers, batch, max_len, mla.latent_width, model.dtype)
    cfg = model.cfg
    return DenseCache.init(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                           model.dtype)


def _kv_bytes_per_token(model: Model) -> int:
    """Bytes one token occupies in the cache (per-head K and V, or MLA's latent row): the
    sizing calculator's figure for the model's config and dtype, which equals the
    buffers the caches allocate (tests/test_sweep_variant_caches.py)."""
    return sizing.kv_bytes_per_token(ArchSpec.from_config(model.cfg),
                                     sizing.storage_dtype(model.dtype))


# Public names of helpers other engines share (kvjax.engine.prefix_generate).
decode = _decode  # the jitted device decode loop, cache donated: returns (ids, cache)
stop_array = _stop_array  # per-sequence stop lists and their padded [B, S] array
to_output = _to_output  # generated ids [B, N] -> GenerationOutput
kv_bytes_per_token = _kv_bytes_per_token  # K + V bytes of one token, all layers
dense_cache = _dense_cache  # the empty preallocated cache generate(cache="dense") uses


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _pool_size(needed: int, num_blocks: int | None, block_size: int, what: str,
               bucket: int = 1) -> int:
    """``num_blocks`` (default ``needed`` rounded up to ``bucket``); a clear ValueError if
    it cannot hold ``needed``."""
    if num_blocks is None:
        return round_up(needed, bucket)
    if num_blocks < needed:
        raise ValueError(f"paged KV pool too small: {what} need {needed} blocks of "
                         f"{block_size} tokens, but num_blocks={num_blocks}")
    return num_blocks


def resolve_attention(attention: str, block_size: int, head_dim: int) -> str:
    """The paged attention backend ``attention`` stands for ("auto" resolved): on GPU,
    when the page layout suits the kernels, "triton" if the Triton kernels can launch
    (``triton_unavailable_reason``), else "pallas"; otherwise "xla"."""
    if attention != "auto":
        return attention
    fits = block_size in KERNEL_PAGE_SIZES and head_dim in KERNEL_HEAD_DIMS
    if jax.default_backend() != "gpu" or not fits:
        return "xla"
    if (reason := triton_unavailable_reason()) is not None:
        logger.info("paged cache: Triton decode kernel unavailable (%s); using the Pallas "
                    "kernel", reason)
        return "pallas"
    return "triton"


def attention_label(attention: str) -> str:
    """A resolved backend as logged: "triton" names its launcher
    (``pallas_kernels.triton_launch``)."""
    return f"triton, launched by {triton_launcher()}" if attention == "triton" else attention


def _generate_paged(model: Model, args: tuple[Any, ...], prompts: Sequence[Sequence[int]],
                    limits: list[int], *, block_size: int, num_blocks: int | None,
                    attention: str, num_steps: int, all_greedy: bool) -> jax.Array:
    """Reserve every sequence's whole budget in a block pool, then run the device loop.

    An MLA model's pool holds latent rows (``PagedLatentCache``; "xla", or the MLA decode
    kernel for the absorbed path's decode steps with "pallas" / "pallas-interpret")."""
    cfg = model.cfg
    _check_block_size(block_size)
    if isinstance(cfg, MLAConfig):
        check_latent_backend(attention, block_size, cfg.rope_key_heads)
    else:
        check_attention_backend(attention, block_size, cfg.head_dim)
    budgets = [len(p) + n for p, n in zip(prompts, limits, strict=True)]
    per_seq = [_ceil_div(t, block_size) for t in budgets]
    pool = _pool_size(sum(per_seq), num_blocks, block_size,
                      f"{len(prompts)} sequences of prompt + max_new_tokens {budgets}",
                      bucket=64)
    logger.info("paged cache: attention backend %s", attention_label(attention))  # checked
    alloc = BlockAllocator(pool, block_size, _kv_bytes_per_token(model))
    ids = list(range(len(prompts)))
    for i, tokens in zip(ids, budgets, strict=True):
        alloc.allocate_sequence(i, tokens)
    try:
        tables = alloc.block_tables_array(ids, table_width(max(per_seq)), pad=-1)
        kv: PagedCache | PagedLatentCache
        if isinstance(cfg, MLAConfig):
            kv = PagedLatentCache.init(cfg.num_layers, pool, block_size, cfg.latent_width,
                                       model.dtype, jnp.asarray(tables), attention=attention,
                                       rope_key_heads=cfg.rope_key_heads)
        else:
            kv = PagedCache.init(cfg.num_layers, pool, block_size, cfg.num_kv_heads,
                                 cfg.head_dim, model.dtype, jnp.asarray(tables),
                                 attention=attention)
        return _generate_cached(*args, kv, num_steps=num_steps, all_greedy=all_greedy)[0]
    finally:
        for i in ids:
            alloc.free_sequence(i)


def generate(model: Model, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int], cache: CacheKind = "dense",
             sampling: SamplingParams | Sequence[SamplingParams] = GREEDY, seed: int = 0,
             stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
             block_size: int = 16, num_blocks: int | None = None,
             attention: str = "auto", keys: jax.Array | None = None) -> GenerationOutput:
    """Generate continuations for a batch of token-id prompts.

    Args:
      model, params: the decoder and its parameters.
      prompts: B lists of token ids, any lengths >= 1.
      max_new_tokens: one limit for all, or one per prompt.
      cache: "dense" (preallocated), "paged" (block pool), "concat" (grows by
        concatenation) or "none". An MLA model runs "dense" or "paged" (latent rows) or "none".
      sampling: one ``SamplingParams`` for all, or one per prompt.
      seed: PRNG seed; the same seed gives the same output.
      stop_token_ids: ids that end a sequence (kept in its output); one list for all or
        one list per prompt.
      block_size: tokens per page of the "paged" cache.
      num_blocks: pages in the "paged" pool; default exactly enough for every
        sequence's prompt + max_new_tokens. A smaller pool raises ValueError.
      attention: decode attention of the "paged" cache: "xla", "pallas" (GPU kernel),
        "pallas-interpret" (the kernel interpreted, CPU), "triton" (Triton kernels, GPU)
        or "auto" (``resolve_attention``: "triton" on GPU when the model's head_dim and
        block_size suit the kernels, "pallas" there if Triton cannot launch, else
        "xla"). The choice is logged.
      keys: optional typed PRNG keys [B] (see ``sample_keys``) replacing ``seed``:
        sequence ``b`` then draws only from ``keys[b]``, so its output does not depend
        on the rest of the batch.
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    cfg = model.cfg
    b = len(prompts)
    limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
    params_list = [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling)
    if len(limits) != b or len(params_list) != b:
        raise ValueError("per-prompt max_new_tokens and sampling must have one entry per prompt")
    validate_prompts(cfg, prompts, limits)
    per_seq_stops, stops = _stop_array(stop_token_ids, b)
    if keys is not None and (not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
                             or keys.shape != (b,)):
        raise ValueError(f"keys must be typed PRNG keys of shape ({b},), got "
                         f"{keys.dtype} {keys.shape}")

    if max(limits) == 0:
        return GenerationOutput(tokens=[[] for _ in prompts], finish_reasons=["length"] * b)
    # Bucketed so nearby budgets share a compiled loop; each sequence still stops at its
    # own limit and the loop exits once all have.
    num_steps = round_up(max(limits), 32)
    width = round_up(max(len(p) for p in prompts), 16)
    tokens, lengths = _right_padded(prompts, width + (num_steps if cache == "none" else 0))
    args: tuple[Any, ...] = (model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                             jnp.asarray(limits, jnp.int32), jnp.asarray(stops),
                             SamplingArrays.from_params(params_list),
                             jax.random.key(seed) if keys is None else keys)
    all_greedy = all(p.greedy for p in params_list)
    if cache == "dense":
        kv = _dense_cache(model, b, round_up(width + num_steps, 64))
        out, _ = _generate_cached(*args, kv, num_steps=num_steps, all_greedy=all_greedy)
    elif cache == "none":
        out = _generate_uncached(*args, num_steps=num_steps, all_greedy=all_greedy)
    elif cache == "paged":
        if isinstance(model, MLADecoder):  # "auto": XLA; the kernel lost to it on an H100
            backend = "xla" if attention == "auto" else attention
        else:
            backend = resolve_attention(attention, block_size, model.cfg.head_dim)
        out = _generate_paged(model, args, prompts, limits, block_size=block_size,
                              num_blocks=num_blocks, attention=backend,
                              num_steps=num_steps, all_greedy=all_greedy)
    elif isinstance(model, MLADecoder):
        raise ValueError(f"cache={cache!r} holds per-head K/V; an MLA model runs with "
                         "'dense' or 'paged' (latent rows) or 'none'")
    else:
        out = _generate_concat(*args, num_steps=num_steps, all_greedy=all_greedy)
    return _to_output(out, per_seq_stops)


@dataclasses.dataclass(frozen=True)
class ForkedGenerationOutput:
    """Samples of one prompt prefilled once, and the block pool while they decoded.

    ``block_tables`` [N, M] and ``refcounts`` [num_blocks] are those of the decode
    (after forking and reserving every sample's tail); ``copies`` are the
    copy-on-write ``(src, dst)`` page copies applied before it.
    """

    output: GenerationOutput  # one row per sample
    prompt_stats: AllocatorStats  # the pool after prefilling the prompt, before forking
    decode_stats: AllocatorStats  # the pool during decode (prompt blocks shared)
    block_tables: np.ndarray  # int32 [N, M], -1 padded
    refcounts: np.ndarray  # int32 [num_blocks]
    copies: list[tuple[int, int]]


def generate_forked(model: Decoder, params: Any, prompt: Sequence[int], num_samples: int, *,
                    max_new_tokens: int,
                    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
                    seed: int = 0, block_size: int = 16, num_blocks: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> ForkedGenerationOutput:
    """Parallel sampling over a shared prefix: prefill ``prompt`` once, decode N samples.

    The prompt is written once into its pages. ``fork`` then gives ``num_samples``
    children the parent's blocks (refcounts, no copy); reserving each child's
    ``max_new_tokens`` copies the shared partial last page (copy-on-write, applied on
    device with ``copy_pages``) for all but the last child and adds private tail
    pages. All samples decode in one batch, sample ``i`` drawing from
    ``sample_keys(seed, [i])[0]``; the blocks used are the prompt's full blocks once
    plus each sample's tail (partial prompt block included).

    Args:
      sampling: one ``SamplingParams`` for all samples, or one per sample.
      num_blocks: pool size; default exactly ``full_prompt_blocks + num_samples *
        (blocks(prompt + max_new_tokens) - full_prompt_blocks)``. Smaller raises ValueError.
    """
    cfg = model.cfg
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    validate_prompts(cfg, [prompt], [max_new_tokens])
    n = num_samples
    params_list = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params_list) != n:
        raise ValueError("per-sample sampling must have one entry per sample")
    per_seq_stops, stops = _stop_array([list(stop_token_ids)] * n, n)
    plen = len(prompt)
    _check_block_size(block_size)
    total = _ceil_div(plen + max_new_tokens, block_size)
    full = plen // block_size
    pool = _pool_size(full + n * (total - full), num_blocks, block_size,
                      f"{n} samples of a {plen}-token prompt + {max_new_tokens} new tokens")
    alloc = BlockAllocator(pool, block_size, _kv_bytes_per_token(model))

    parent = n  # children are 0..n-1
    alloc.allocate_sequence(parent, plen)
    width = round_up(plen, 16)
    tokens, lengths = _right_padded([prompt], width)
    kv = PagedCache.init(cfg.num_layers, pool, block_size, cfg.num_kv_heads, cfg.head_dim,
                         model.dtype, jnp.asarray(alloc.block_tables_array([parent], total, -1)))
    lengths_j = jnp.asarray(lengths)
    logits, kv = forward_step(model, params, jnp.asarray(tokens), _positions(width, lengths_j),
                              kv, lengths_j - 1)
    prompt_stats = alloc.stats()

    children = list(range(n))
    for c in children:
        alloc.fork(parent, c)
    alloc.free_sequence(parent)
    copies: list[tuple[int, int]] = []
    for c in children:
        copies += alloc.append_tokens(c, max_new_tokens)
    decode_stats = alloc.stats()
    refcounts = np.asarray([alloc.refcount(i) for i in range(pool)], np.int32)
    tables = alloc.block_tables_array(children, total, pad=-1)
    try:
        if max_new_tokens == 0:
            return ForkedGenerationOutput(
                GenerationOutput([[] for _ in children], ["length"] * n), prompt_stats,
                decode_stats, tables, refcounts, copies)
        if copies:
            src, dst = (jnp.asarray(c, jnp.int32) for c in zip(*copies, strict=True))
            kv = _copy_pages(kv, src, dst)
        kv = with_block_tables(kv, jnp.asarray(tables), jnp.full((n,), plen, jnp.int32))
        # A fresh lengths array: kv (and so kv.lengths) is donated to the loop.
        out, _ = _decode(model, params, jnp.repeat(logits, n, axis=0),
                         jnp.full((n,), plen, jnp.int32),
                         jnp.full((n,), max_new_tokens, jnp.int32), jnp.asarray(stops),
                         SamplingArrays.from_params(params_list), sample_keys(seed, children),
                         kv, num_steps=max_new_tokens,
                         all_greedy=all(p.greedy for p in params_list))
        return ForkedGenerationOutput(_to_output(out, per_seq_stops), prompt_stats,
                                      decode_stats, tables, refcounts, copies)
    finally:
        for c in children:
            alloc.free_sequence(c)
