"""PagedAttention decode as a Pallas kernel, with FlashDecoding split-K.

PagedAttention (Kwon et al., 2023) keeps K/V in a pool of fixed-size pages,
``[num_pages, page_size, n_kv, head_dim]`` per layer (token-major, the layout of
``kvjax.cache.paged``); sequence ``b`` finds its token ``p`` in page
``block_tables[b, p // page_size]`` at offset ``p % page_size``. FlashDecoding
(Dao et al., 2023) splits each sequence's pages into ``num_splits`` ranges that are
processed in parallel and merged afterwards, so one decode token still fills the GPU.

Design:
  * One query token per sequence. The grid is ``(batch, kv_head, split)``; a program
    takes all ``group = H // K`` query heads of its KV head together (``[group, D]``
    rows), so every page is read once per group.
  * Pages are not moved by BlockSpecs: the program sees the whole pool of its KV head
    (``[P, S, D]``) and reads page ``table[i]`` with a dynamic scalar index inside a
    ``lax.fori_loop``. Block tables and lengths are ordinary inputs, one row per
    sequence (scalar prefetch is TPU-only, ``pltpu.PrefetchScalarGridSpec``).
  * Online softmax (running max ``m`` / sum ``den`` / unnormalised ``o`` in float32)
    over ``pages_per_block`` pages per loop step; each page of the step is scored and
    multiplied on its own (``[group, S]`` tiles), so no gather or concatenate is
    needed and only generic ops are used (``pl.program_id``, ``pl.cdiv``, ref
    indexing, ``lax.dot_general``, ``lax.fori_loop``).
  * Each split writes its partial ``(o, m, den)``; ``combine_splits`` (plain jnp,
    outside the kernel; shared with ``pallas_kernels.triton_paged_decode``) rescales the
    splits to a common max and normalises.
  * Masking uses a finite ``MASKED`` logit and zeroes masked probabilities
    explicitly, so empty splits, length-0 sequences and missing pages (table entries
    outside ``[0, P)``, treated as in ``paged_attention_reference``) give zeros, never
    NaN.

Only the Pallas HLO interpreter (``interpret=True``) is exercised here, on CPU. The
query group is zero-padded to a power of two rows (>= 16 when not interpreting), as the
Triton lowering needs power-of-two tiles and ``tl.dot`` wants M >= 16.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

MASKED = -1e30
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
HEAD_DIMS = (64, 128, 256)  # head widths the kernels support
PAGE_SIZES = (8, 16, 32, 64, 128)  # page sizes the kernels support


# ---------------------------------------------------------------- (1) the kernel


Carry = tuple[jax.Array, jax.Array, jax.Array]  # o [rows, D], m [rows], den [rows], f32


def attend_pages(q: jax.Array, k_ref: jax.Ref, v_ref: jax.Ref, table_ref: jax.Ref,
                 start: jax.Array, pages_per_block: int, last_visible: jax.Array,
                 carry: Carry, scale: float) -> Carry:
    """One online-softmax step over table entries ``[start, start + pages_per_block)``.

    q [rows, D]; k_ref/v_ref [P, S, D] (one KV head's pool); table_ref [M'] page ids
    (entries outside [0, P) are missing pages); ``last_visible`` int, broadcastable to
    [rows, S]: a row sees positions ``<= last_visible``. Shared by the decode and the
    chunked-prefill kernels. Each page is scored as its own [rows, S] tile.
    """
    num_pages, page_size, _ = k_ref.shape
    o, m, den = carry
    slot = lax.broadcasted_iota(jnp.int32, (q.shape[0], page_size), 1)
    scores, masks, values = [], [], []
    for j in range(pages_per_block):  # static
        entry = table_ref[start + j]
        real = (entry >= 0) & (entry < num_pages)
        page = jnp.clip(entry, 0, num_pages - 1)
        s = lax.dot_general(q, k_ref[page], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [rows, S]
        mask = real & ((start + j) * page_size + slot <= last_visible)  # [rows, S]
        scores.append(jnp.where(mask, s, MASKED))
        masks.append(mask)
        values.append(v_ref[page])  # [S, D]
    m_new = m
    for s in scores:
        m_new = jnp.maximum(m_new, s.max(axis=1))
    alpha = jnp.exp(m - m_new)  # [rows]; m, m_new finite
    o, den = o * alpha[:, None], den * alpha
    for s, mask, v in zip(scores, masks, values, strict=True):
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)  # [rows, S]
        den = den + p.sum(axis=1)
        o = o + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return o, m_new, den


def _decode_kernel(
    table_ref: jax.Ref,  # int32 [pages_padded]: this sequence's block table, -1 padded
    length_ref: jax.Ref,  # int32 [1]: tokens held by this sequence
    q_ref: jax.Ref,  # [rows, D]: this KV head's query heads, zero-padded to rows
    k_ref: jax.Ref,  # [P, S, D]: keys of this KV head, whole pool
    v_ref: jax.Ref,  # [P, S, D]: values of this KV head, whole pool
    o_ref: jax.Ref,  # f32 [rows, D]: unnormalised output of this split
    m_ref: jax.Ref,  # f32 [rows]: running max of this split's logits
    den_ref: jax.Ref,  # f32 [rows]: running softmax denominator of this split
    *,
    pages_per_split: int,
    pages_per_block: int,
    scale: float,
) -> None:
    page_size = k_ref.shape[1]
    length = length_ref[0]
    first = pl.program_id(2) * pages_per_split
    stop = jnp.minimum(first + pages_per_split, pl.cdiv(length, page_size))
    num_blocks = pl.cdiv(jnp.maximum(stop - first, 0), pages_per_block)
    q = q_ref[...]  # [rows, D]

    def body(i: jax.Array, carry: Carry) -> Carry:
        return attend_pages(q, k_ref, v_ref, table_ref, first + i * pages_per_block,
                            pages_per_block, length - 1, carry, scale)

    init = (jnp.zeros(o_ref.shape, jnp.float32),
            jnp.full(m_ref.shape, MASKED, jnp.float32),
            jnp.zeros(den_ref.shape, jnp.float32))
    o, m, den = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = o
    m_ref[...] = m
    den_ref[...] = den


# ------------------------------------------------------- (2) the gridded pallas_call


def pool_spec(shape: tuple[int, ...], layer: int | None) -> pl.BlockSpec:
    """Give a program (grid axis 1 = KV head) that head's whole pool ``[P, S, D]``.

    ``shape`` is ``[P, S, K, D]``, or a layer-stacked ``[L, P, S, K, D]`` read in place at
    ``layer`` (no copy of the layer's slab is made).
    """
    num_pages, page_size, _, head_dim = shape[-4:]
    if layer is None:
        return pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, h, s: (0, 0, h, 0))
    return pl.BlockSpec((None, num_pages, page_size, None, head_dim),
                        lambda b, h, s: (layer, 0, 0, h, 0))


def _decode_partials(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     tables: jax.Array, lengths: jax.Array, *, num_splits: int,
                     pages_per_split: int, pages_per_block: int, num_warps: int,
                     num_stages: int, layer: int | None, interpret: bool
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-split partials of every sequence and KV head.

    q [B, K, G, D]; k/v_pages [P, S, K, D]; tables int32 [B, num_splits *
    pages_per_split]; lengths int32 [B, 1] -> o f32 [B, K, splits, G, D], m and den
    f32 [B, K, splits, G].
    """
    batch, kv_heads, group, head_dim = q.shape
    kernel = functools.partial(_decode_kernel, pages_per_split=pages_per_split,
                               pages_per_block=pages_per_block, scale=head_dim ** -0.5)
    pool = pool_spec(k_pages.shape, layer)
    stat_shape = (batch, kv_heads, num_splits, group)
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, tables.shape[1]), lambda b, h, s: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pool,
            pool,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*stat_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(stat_shape, jnp.float32),
            jax.ShapeDtypeStruct(stat_shape, jnp.float32),
        ],
        interpret=interpret,
        # Triton chosen explicitly: the default GPU lowering of a pl.pallas_call may be
        # Mosaic GPU, whose copies this kernel's small table/length blocks do not fit.
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name="paged_decode_attention",
    )(tables, lengths, q, k_pages, v_pages)


COMBINE_FORMS = ("reduce", "unrolled")
# How ``combine_splits`` merges splits by default: "unrolled" took one kernel a layer
# (24 a step) and 18 us of kernel time off the engine's 8 x 512 decode step on an H100,
# and changed nothing at 32 x 512 (docs/serving-engine.md, 2026-12-07).
COMBINE_FORM = "unrolled"
MAX_UNROLLED_SPLITS = 8


def combine_splits(o: jax.Array, m: jax.Array, den: jax.Array, group: int,
                   dtype: jnp.dtype, *, form: str | None = None) -> jax.Array:
    """Merge FlashDecoding split partials into the attention output.

    o f32 [B, K, n, R, D] (unnormalised), m and den f32 [B, K, n, R] (running max and
    softmax denominator of each split), R >= ``group`` rows of which the first ``group``
    are real -> [B, K * group, D] in ``dtype``. Shared by the Pallas and Triton kernels.

    ``form`` (None: ``COMBINE_FORM``): ``"reduce"`` takes the max and the weighted sums
    as reductions over the split axis; ``"unrolled"`` (for at most
    ``MAX_UNROLLED_SPLITS`` splits, else ``"reduce"``) writes them as elementwise
    maxima and sums of the ``n`` split slices: no reduction, so XLA can emit the whole
    merge as one elementwise fusion instead of a reduction feeding another. Both are
    the same arithmetic up to float32 summation order. (A one-pass form, a variadic
    reduction merging partials at their common max, measured slower in the engine's
    decode step on an H100: docs/serving-engine.md.)
    """
    form = COMBINE_FORM if form is None else form
    if form not in COMBINE_FORMS:
        raise ValueError(f"form must be one of {COMBINE_FORMS}, got {form!r}")
    batch, kv_heads, splits, _, head_dim = o.shape
    o, m, den = o[:, :, :, :group], m[:, :, :, :group], den[:, :, :, :group]
    if form == "unrolled" and splits <= MAX_UNROLLED_SPLITS:
        ms = [m[:, :, s] for s in range(splits)]
        m_all = functools.reduce(jnp.maximum, ms)
        ws = [jnp.exp(m_s - m_all) for m_s in ms]  # empty splits: m = MASKED -> weight 0
        denom = functools.reduce(jnp.add, [w * den[:, :, s] for s, w in enumerate(ws)])
        total = functools.reduce(jnp.add, [w[..., None] * o[:, :, s]
                                           for s, w in enumerate(ws)])
    else:
        w = jnp.exp(m - m.max(axis=2, keepdims=True))
        denom = (w * den).sum(axis=2)
        total = (w[..., None] * o).sum(axis=2)
    out = total / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(batch, kv_heads * group, head_dim).astype(dtype)


SPLIT_PROGRAMS = 256  # auto_num_splits aims at about this many programs
MAX_SPLITS = 8


def auto_num_splits(batch: int, kv_heads: int, max_blocks: int) -> int:
    """Splits for about ``SPLIT_PROGRAMS`` programs (``batch * kv_heads * splits``), at
    most ``MAX_SPLITS`` and at most one per table column — the best setting in the H100
    sweep recorded in docs/paged-decode-kernel.md (256 programs, 8 splits)."""
    return max(1, min(MAX_SPLITS, SPLIT_PROGRAMS // max(batch * kv_heads, 1), max_blocks))


# ------------------------------------------------------------ (3) the public wrapper


def host_value(x: jax.Array) -> np.ndarray | None:
    """``x`` as a numpy array, or None when it is traced (under an outer jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
    """Compiler params selecting Pallas's Triton lowering for a ``pl.pallas_call`` on GPU.

    Imported here, not at module load: that lowering is deprecated as of JAX 0.11 and will
    be removed. Without it the Pallas GPU kernels raise a clear error while everything
    else (the CPU interpreter path, the jax-triton kernels, the XLA path) still imports
    and runs.
    """
    try:
        from jax.experimental.pallas import triton as plt
    except ImportError as err:
        raise RuntimeError("this JAX has no Pallas Triton lowering: use attention='triton' "
                           "(the jax-triton kernels) or 'xla'") from err
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_paged_args(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     block_tables: jax.Array, lengths: jax.Array, pages_per_block: int,
                     num_splits: int, *, q_rank: int = 3, layer: int | None = None) -> None:
    """Raise ValueError on bad paged-attention arguments; q is [B, (T,) H, D].

    Shared with ``pallas_kernels.chunked_prefill`` (``q_rank=4``).
    """
    pool_rank = 4 if layer is None else 5
    for name, x, rank in (("q", q, q_rank), ("k_pages", k_pages, pool_rank),
                          ("v_pages", v_pages, pool_rank),
                          ("block_tables", block_tables, 2), ("lengths", lengths, 1)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ in shape")
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if layer is not None and not (isinstance(layer, int) and 0 <= layer < k_pages.shape[0]):
        raise ValueError(f"layer must be an int in [0, {k_pages.shape[0]}), got {layer!r}")
    num_pages, page_size, kv_heads, page_dim = k_pages.shape[-4:]
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"q, k_pages and v_pages must share a dtype, got {q.dtype}, "
                         f"{k_pages.dtype}, {v_pages.dtype}")
    if page_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, pages have {page_dim}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; use one of {HEAD_DIMS}")
    if heads % kv_heads:
        raise ValueError(f"num query heads {heads} not divisible by num kv heads {kv_heads}")
    check_table_args(q.dtype, batch, num_pages, page_size, block_tables, lengths,
                     pages_per_block, num_splits)


def check_table_args(dtype: jnp.dtype, batch: int, num_pages: int, page_size: int,
                     block_tables: jax.Array, lengths: jax.Array, pages_per_block: int,
                     num_splits: int) -> None:
    """Raise ValueError on the arguments every paged kernel shares: the dtype, the
    block tables and lengths of ``batch`` sequences over a pool of ``num_pages`` pages of
    ``page_size`` tokens, and the split / step settings."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; use bfloat16, float16 or float32")
    for name, x in (("block_tables", block_tables), ("lengths", lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")
    if block_tables.shape[0] != batch or lengths.shape[0] != batch:
        raise ValueError(f"batch mismatch: q has {batch}, block_tables "
                         f"{block_tables.shape[0]}, lengths {lengths.shape[0]}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size {page_size} unsupported; use one of {PAGE_SIZES}")
    if num_pages < 1 or block_tables.shape[1] < 1:
        raise ValueError(f"need at least one page and one table column, got "
                         f"{num_pages} pages and block_tables {block_tables.shape}")
    for name, value in (("num_splits", num_splits), ("pages_per_block", pages_per_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    host = host_value(lengths)
    capacity = block_tables.shape[1] * page_size
    if host is not None and host.size and (host.min() < 0 or host.max() > capacity):
        raise ValueError(f"lengths must lie in [0, max_blocks * page_size = {capacity}], "
                         f"got min {host.min()} max {host.max()}")


def split_tables(block_tables: jax.Array, lengths: jax.Array, page_size: int,
                 num_splits: int, pages_per_block: int
                 ) -> tuple[jax.Array, jax.Array, int, int]:
    """Tables and lengths laid out for a split-K decode grid.

    Returns int32 tables [B, num_splits * pages_per_split] (-1 padded), lengths int32
    [B, 1] clipped to the table's capacity, ``pages_per_split`` (a multiple of the step)
    and ``pages_per_block`` (clamped to the split).
    """
    max_blocks = block_tables.shape[1]
    pages_per_split = pl.cdiv(max_blocks, num_splits)
    pages_per_block = min(pages_per_block, pages_per_split)
    pages_per_split = pl.cdiv(pages_per_split, pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, num_splits * pages_per_split - max_blocks)),
                     constant_values=-1)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_blocks * page_size)[:, None]
    return tables, lengths, pages_per_split, pages_per_block


@functools.partial(jax.jit, static_argnames=("pages_per_block", "num_splits", "group_rows",
                                             "num_warps", "num_stages", "layer", "interpret"))
def _paged_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  block_tables: jax.Array, lengths: jax.Array, *, pages_per_block: int,
                  num_splits: int, group_rows: int, num_warps: int, num_stages: int,
                  layer: int | None, interpret: bool) -> jax.Array:
    """The kernel plus combine; the query group is zero-padded to ``group_rows`` rows."""
    batch, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[-3:-1]
    tables, lengths, pages_per_split, pages_per_block = split_tables(
        block_tables, lengths, page_size, num_splits, pages_per_block)
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_rows - group), (0, 0)))
    o, m, den = _decode_partials(qg, k_pages, v_pages, tables, lengths, num_splits=num_splits,
                               pages_per_split=pages_per_split,
                               pages_per_block=pages_per_block, num_warps=num_warps,
                               num_stages=num_stages, layer=layer, interpret=interpret)
    return combine_splits(o, m, den, group, q.dtype)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_tables: jax.Array, lengths: jax.Array, *,
                           pages_per_block: int = 8, num_splits: int | None = None,
                           num_warps: int = 4, num_stages: int = 3,
                           layer: int | None = None, interpret: bool = False) -> jax.Array:
    """Decode attention of one new token per sequence over paged K/V (jitted kernel).

    Args:
      q: [B, H, D] queries, bf16/fp16/fp32; head ``h`` uses KV head ``h // (H // K)``.
      k_pages, v_pages: [P, S, K, D] one layer of the pool, same dtype as ``q``;
        S in {8, ..., 128} (power of two), D in {64, 128, 256}.
      block_tables: int [B, M]; entries outside [0, P) are missing pages (not attended).
      lengths: int [B] tokens per sequence, in [0, M * S]; the query attends
        positions ``[0, length)``; length 0 gives a zero row.
      pages_per_block: pages per online-softmax step (clamped to the split size).
      num_splits: FlashDecoding split-K factor over the M table columns; None picks
        enough splits for about 256 programs (``B * K * splits``), at most 8 — the best
        setting in the H100 sweep recorded in docs/paged-decode-kernel.md.
      num_warps, num_stages: Triton launch settings (ignored when interpreting).
      layer: if given, ``k_pages``/``v_pages`` are a layer-stacked ``[L, P, S, K, D]``
        pool and layer ``layer`` is read in place.
      interpret: run the Pallas HLO interpreter (needed on CPU).

    Returns:
      [B, H, D] in the dtype of ``q``.

    Raises:
      ValueError: on bad ranks, shapes, dtypes or options, before launching; on
        lengths outside [0, M * S] when ``lengths`` is concrete (traced lengths are
        clamped instead).
    """
    check_paged_args(q, k_pages, v_pages, block_tables, lengths, pages_per_block,
                     1 if num_splits is None else num_splits, layer=layer)
    if num_splits is None:
        num_splits = auto_num_splits(q.shape[0], k_pages.shape[-2], block_tables.shape[1])
    # Triton wants power-of-two tiles and >= 16 rows for tl.dot; the interpreter doesn't.
    rows = pl.next_power_of_2(q.shape[1] // k_pages.shape[-2])
    return _paged_decode(q, k_pages, v_pages, block_tables, lengths,
                         pages_per_block=pages_per_block, num_splits=num_splits,
                         group_rows=rows if interpret else max(rows, 16),
                         num_warps=num_warps, num_stages=num_stages, layer=layer,
                         interpret=interpret)


# -------------------------------------------------------- (4) the pure-jnp reference


@jax.jit
def paged_decode_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                     block_tables: jax.Array, lengths: jax.Array) -> jax.Array:
    """Gather every sequence's pages and run a masked float32 softmax. Same contract."""
    batch, heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    span = block_tables.shape[1] * page_size
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    k = k_pages[pages].reshape(batch, span, kv_heads, head_dim).astype(jnp.float32)
    v = v_pages[pages].reshape(batch, span, kv_heads, head_dim).astype(jnp.float32)
    real = jnp.repeat((block_tables >= 0) & (block_tables < num_pages), page_size, axis=1)
    mask = real & (jnp.arange(span)[None, :] < lengths[:, None])  # [B, span]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, precision=hi) * head_dim ** -0.5
    mask = mask[:, None, None, :]
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    w = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    denom = w.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", w / jnp.where(denom > 0, denom, 1.0), v, precision=hi)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
