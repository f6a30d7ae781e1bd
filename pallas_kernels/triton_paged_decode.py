"""PagedAttention decode as a Triton kernel, launched from JAX by
``pallas_kernels.triton_launch`` (XLA's Triton custom call or jax-triton).

The same algorithm and contract as ``pallas_kernels.paged_decode`` (token-major pages
``[P, S, K, D]``, one query token per sequence, all query heads of a KV group per
program, FlashDecoding split-K merged by the shared ``combine_splits``, lengths masking,
missing pages and empty sequences give zeros, the same ``check_paged_args``), written
directly in Triton (``pallas_kernels.triton_decode_kernel``) instead of through Pallas's
Triton lowering, which is deprecated as of JAX 0.11. Differences in the program: an
online-softmax step is ``block_tokens`` tokens (a power of two >= 16: the P·V
``tl.dot`` contracts over them and needs K >= 16) gathered from their pages into one
``[block_tokens, D]`` tile and scored with one ``tl.dot`` — several pages, or part of a
page when pages are large — instead of a number of whole pages; and a layer-stacked
pool is read in place through a layer index passed as a scalar.

``decode_launch`` is a pure function from shapes and tunables to the launch (grid,
scalar arguments, constexpr meta-parameters, warps, stages, output shapes); the
launch here and the Triton-interpreter tests both launch from it. ``triton`` (and
``jax_triton`` when ``pallas_kernels.triton_launch`` uses it) are imported only when the
kernel runs, so this module imports anywhere; ``triton_unavailable_reason`` tells
whether the kernel can run here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import auto_num_splits, check_paged_args, combine_splits
from pallas_kernels.triton_launch import triton_call, triton_launcher

MIN_BLOCK_TOKENS = 16  # query rows (one mma tile) and step tokens (tl.dot needs K >= 16)
MAX_TILE_BYTES = 8 * 1024  # default step: one K (and one V) tile of at most this size
H100_SHARED_BYTES = 232448  # shared memory one program may use on an H100 (227 KiB)
WARPS = (1, 2, 4, 8, 16)


def _is_power_of_two(x: object) -> bool:
    return isinstance(x, int) and x >= 1 and x & (x - 1) == 0


def rows_within(max_bytes: int, cap: int, head_dim: int, itemsize: int) -> int:
    """The most rows (at most ``cap``, at least ``MIN_BLOCK_TOKENS``) of a ``[rows,
    head_dim]`` tile of ``itemsize``-byte elements within ``max_bytes``: the tile rule of
    the Triton kernels' default steps and query tiles."""
    return max(MIN_BLOCK_TOKENS, min(cap, max_bytes // (head_dim * itemsize)))


def default_block_tokens(head_dim: int, itemsize: int) -> int:
    """Tokens per step: the most (at most 128) whose ``[tokens, head_dim]`` tile fits
    ``MAX_TILE_BYTES``: 32 for 16-bit head_dim 128. Small tiles, many in flight: with
    the table prefetched and 4 stages, 32-token steps were the fastest launch, or within
    a point of it, on every H100 row measured (docs/paged-decode-kernel.md, 2026-12-06)."""
    return rows_within(MAX_TILE_BYTES, 128, head_dim, itemsize)


def check_launch_settings(block_tokens: int, num_warps: int, num_stages: int) -> None:
    """ValueError unless ``block_tokens`` is a power of two >= 16, ``num_warps`` is in
    ``WARPS`` and ``num_stages`` >= 1 (shared by the Triton kernels)."""
    if not _is_power_of_two(block_tokens) or block_tokens < MIN_BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be a power of two >= {MIN_BLOCK_TOKENS}, "
                         f"got {block_tokens!r}")
    if num_warps not in WARPS:
        raise ValueError(f"num_warps must be one of {WARPS}, got {num_warps!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")


def dot_precision(dtype: jnp.dtype) -> str:
    """``tl.dot``'s input precision: exact fp32 products for fp32 pages (tl.dot would
    use TF32); ignored for 16-bit operands."""
    return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """One launch of ``paged_decode_kernel``, everything but the arrays.

    The kernel takes (q, k_pages, v_pages, block_tables, lengths, *scalars) then the
    outputs (o, m, den: float32 arrays of ``partial_shapes``; with one split o is the
    normalised output in q's dtype), then ``meta`` by name.
    """

    grid: tuple[int, int, int]  # (batch, kv_heads, num_splits)
    scalars: tuple[int, int]  # (layer, num_pages)
    meta: tuple[tuple[str, int | float | str], ...]  # the tl.constexpr parameters
    num_warps: int
    num_stages: int
    partial_shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @property
    def group(self) -> int:
        return int(dict(self.meta)["GROUP"])


def decode_launch(q_shape: tuple[int, ...], pool_shape: tuple[int, ...], max_blocks: int,
                  dtype: jnp.dtype, *, layer: int | None, block_tokens: int | None,
                  num_splits: int | None, num_warps: int, num_stages: int,
                  prefetch_table: bool = True, head_major: bool = False) -> DecodeLaunch:
    """The launch for q ``[B, H, D]`` over a pool ``[P, S, K, D]`` (or ``[L, P, S, K, D]``
    read at ``layer``; with ``head_major`` ``[(L,) P, K, S, D]``) with ``max_blocks`` table
    columns; arguments already passed ``check_paged_args``. None picks the default:
    ``default_block_tokens``, ``auto_num_splits``.

    Raises:
      ValueError: on ``block_tokens`` not a power of two >= 16, ``num_warps`` not in
        ``WARPS`` or ``num_stages`` < 1.
    """
    batch, heads, head_dim = q_shape
    num_pages, page_size, kv_heads, _ = token_major_shape(pool_shape[-4:], head_major)
    if block_tokens is None:
        block_tokens = default_block_tokens(head_dim, jnp.dtype(dtype).itemsize)
    check_launch_settings(block_tokens, num_warps, num_stages)
    if num_splits is None:
        num_splits = auto_num_splits(batch, kv_heads, max_blocks)
    # A step spans no more than a split's share of the table's tokens (rounded up to a
    # power of two); the kernel shares each row's own steps among the splits.
    split_tokens = 1 << (-(-max_blocks // num_splits) * page_size - 1).bit_length()
    block_tokens = max(MIN_BLOCK_TOKENS, min(block_tokens, split_tokens))
    group = heads // kv_heads
    meta = (("GROUP", group), ("ROWS", max(MIN_BLOCK_TOKENS, 1 << (group - 1).bit_length())),
            ("HEAD_DIM", head_dim), ("PAGE_SIZE", page_size), ("KV_HEADS", kv_heads),
            ("LAYER_STRIDE", math.prod(pool_shape[-4:])),
            ("MAX_BLOCKS", max_blocks), ("NUM_SPLITS", num_splits),
            ("BLOCK_TOKENS", block_tokens),
            ("SCALE", head_dim ** -0.5), ("DOT_PRECISION", dot_precision(dtype)),
            ("PREFETCH_TABLE", bool(prefetch_table)), ("HEAD_MAJOR", bool(head_major)))
    stats = (batch, kv_heads, num_splits, group)
    return DecodeLaunch(grid=(batch, kv_heads, num_splits), scalars=(layer or 0, num_pages),
                        meta=meta, num_warps=num_warps, num_stages=num_stages,
                        partial_shapes=((*stats, head_dim), stats, stats))


PAGE_LAYOUTS = ("token-major", "head-major")


def token_major_shape(page_shape: tuple[int, ...], head_major: bool) -> tuple[int, ...]:
    """``(P, S, K, D)`` of a pool's trailing page shape, ``(P, K, S, D)`` when head-major."""
    if not head_major:
        return tuple(page_shape)
    num_pages, kv_heads, page_size, head_dim = page_shape
    return num_pages, page_size, kv_heads, head_dim


def _checked_launch(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *, page_layout: str,
                    layer: int | None, block_tokens: int | None, num_splits: int | None,
                    num_warps: int, num_stages: int, prefetch_table: bool) -> DecodeLaunch:
    """``check_paged_args`` on the pools seen token-major, then ``decode_launch``: the
    argument checks and launch of both public decode functions."""
    if page_layout not in PAGE_LAYOUTS:
        raise ValueError(f"page_layout must be one of {PAGE_LAYOUTS}, got {page_layout!r}")
    head_major = page_layout == "head-major"

    def seen(pages: jax.Array) -> jax.Array:
        if not head_major or pages.ndim not in (4, 5):
            return pages
        shape = pages.shape[:-4] + token_major_shape(pages.shape[-4:], True)
        return jax.ShapeDtypeStruct(shape, pages.dtype)  # type: ignore[return-value]

    check_paged_args(q, seen(k_pages), seen(v_pages), block_tables, lengths, 1,
                     1 if num_splits is None else num_splits, layer=layer)
    return decode_launch(q.shape, k_pages.shape, block_tables.shape[1], q.dtype, layer=layer,
                         block_tokens=block_tokens, num_splits=num_splits,
                         num_warps=num_warps, num_stages=num_stages,
                         prefetch_table=prefetch_table, head_major=head_major)


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run in this process, or None when it can: it needs
    a GPU as JAX's default backend and the ``triton`` package (and ``jax_triton`` when
    ``KVJAX_TRITON_LAUNCH`` selects it; ``pallas_kernels.triton_launch``)."""
    if jax.default_backend() != "gpu":
        return f"JAX's default backend is {jax.default_backend()}, not gpu"
    try:
        launcher = triton_launcher()
    except ValueError as err:
        return str(err)
    for package in ("triton",) + (("jax_triton",) if launcher == "jax-triton" else ()):
        try:
            importlib.import_module(package)
        except ImportError as err:
            return f"cannot import {package}: {err}"
    return None


def _out_shapes(launch: DecodeLaunch, dtype: jnp.dtype) -> list[jax.ShapeDtypeStruct]:
    """The kernel's (o, m, den): float32 partials, or with one split o normalised in q's
    dtype (the kernel writes it; no combine)."""
    o_dtype = dtype if launch.grid[2] == 1 else jnp.float32
    return [jax.ShapeDtypeStruct(s, dt) for s, dt in zip(
        launch.partial_shapes, (o_dtype, jnp.float32, jnp.float32), strict=True)]


def _merge(q: jax.Array | jax.ShapeDtypeStruct, o: jax.Array, m: jax.Array, den: jax.Array,
           launch: DecodeLaunch) -> jax.Array:
    """[B, H, D] in q's dtype from the kernel's outputs (the combine, for several splits)."""
    if launch.grid[2] == 1:
        return o.reshape(q.shape)
    return combine_splits(o, m, den, launch.group, q.dtype)


@functools.partial(jax.jit, static_argnames=("launch",))
def _decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
            lengths: jax.Array, *, launch: DecodeLaunch) -> jax.Array:
    """The kernel through ``triton_launch.triton_call``, then the split combine (none for
    one split: the kernel normalises and writes ``q``'s dtype, one launch in all)."""
    from pallas_kernels.triton_decode_kernel import paged_decode_kernel

    o, m, den = triton_call(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        *launch.scalars, kernel=paged_decode_kernel, out_shape=_out_shapes(launch, q.dtype),
        grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
        name="kvjax_paged_decode", **dict(launch.meta))
    return _merge(q, o, m, den, launch)


@functools.partial(jax.jit, static_argnames=("launch",))
def _decode_append(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                   block_tables: jax.Array, lengths: jax.Array, *,
                   launch: DecodeLaunch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``paged_decode_append_kernel`` on q and the new K/V packed ``[B, H + 2K, D]``: the
    pools are outputs aliased to their inputs (written in place when the caller's pool
    buffer can be reused, as in a jitted step that threads the pool through)."""
    from pallas_kernels.triton_decode_kernel import paged_decode_append_kernel

    pools = [jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2
    heads = qkv.shape[1] - 2 * launch.grid[1]
    q = jax.ShapeDtypeStruct((qkv.shape[0], heads, qkv.shape[2]), qkv.dtype)
    o, m, den, k_pages, v_pages = triton_call(
        qkv, k_pages, v_pages, block_tables.astype(jnp.int32),
        lengths.astype(jnp.int32), *launch.scalars, kernel=paged_decode_append_kernel,
        out_shape=_out_shapes(launch, qkv.dtype) + pools, input_output_aliases={1: 3, 2: 4},
        grid=launch.grid, num_warps=launch.num_warps, num_stages=launch.num_stages,
        name="kvjax_paged_decode_append", **dict(launch.meta))
    return _merge(q, o, m, den, launch), k_pages, v_pages


def triton_paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                  block_tables: jax.Array, lengths: jax.Array, *,
                                  block_tokens: int | None = None,
                                  num_splits: int | None = None, num_warps: int = 4,
                                  num_stages: int = 4, layer: int | None = None,
                                  prefetch_table: bool = True,
                                  page_layout: str = "token-major") -> jax.Array:
    """Decode attention of one new token per sequence over paged K/V (Triton kernel, GPU).

    Args:
      q: [B, H, D] queries, bf16/fp16/fp32; head ``h`` uses KV head ``h // (H // K)``.
      k_pages, v_pages: [P, S, K, D] one layer of the pool, same dtype as ``q``;
        S in {8, ..., 128}, D in {64, 128, 256}.
      block_tables: int [B, M]; entries outside [0, P) are missing pages (not attended).
      lengths: int [B] tokens per sequence, in [0, M * S]; the query attends positions
        ``[0, length)``; length 0 gives a zero row.
      block_tokens: tokens per online-softmax step, a power of two >= 16 (clamped to
        the split); None: ``default_block_tokens`` (32 for 16-bit head_dim 128).
      num_splits: FlashDecoding split-K factor over the M table columns; None:
        ``auto_num_splits`` (about 256 programs, at most 8), as the Pallas kernel.
      num_warps, num_stages: Triton launch settings.
      layer: if given, ``k_pages``/``v_pages`` are a layer-stacked ``[L, P, S, K, D]``
        pool and layer ``layer`` is read in place.
      prefetch_table: read each step's block-table entries one step ahead, so that the
        K/V addresses come from the previous step and Triton's pipeliner keeps
        ``num_stages - 1`` K/V tiles in flight (read in the step itself, the table load
        sits between the tiles and the pipeliner keeps fewer; see
        docs/paged-decode-kernel.md).
      page_layout: ``"token-major"`` (pages ``[P, S, K, D]``, the paged cache's layout)
        or ``"head-major"`` (pages ``[P, K, S, D]``: one contiguous ``S * D`` run per KV
        head; for measuring the layout, docs/paged-decode-kernel.md).

    Returns:
      [B, H, D] in the dtype of ``q``.

    Raises:
      ValueError: as ``paged_decode_attention`` (``check_paged_args``) and on Triton
        launch settings ``decode_launch`` rejects, before launching.
    """
    launch = _checked_launch(q, k_pages, v_pages, block_tables, lengths,
                             page_layout=page_layout, layer=layer, block_tokens=block_tokens,
                             num_splits=num_splits, num_warps=num_warps,
                             num_stages=num_stages, prefetch_table=prefetch_table)
    return _decode(q, k_pages, v_pages, block_tables, lengths, launch=launch)


def triton_paged_decode_append(q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                               k_pages: jax.Array, v_pages: jax.Array,
                               block_tables: jax.Array, lengths: jax.Array, *,
                               block_tokens: int | None = None, num_splits: int | None = None,
                               num_warps: int = 4, num_stages: int = 4,
                               layer: int | None = None, prefetch_table: bool = True,
                               page_layout: str = "token-major"
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Append each sequence's new token to its pages and attend over them, one launch.

    Equal to scattering ``k_new``/``v_new`` into position ``lengths - 1`` of each
    sequence (its page ``block_tables[b, (length - 1) // S]``, offset ``(length - 1) % S``;
    dropped for length 0, a position past the table or a missing page) and then
    ``triton_paged_decode_attention``: what a decode step of a paged cache does per layer,
    without the scatter's launches. The program whose split holds the new token stores it
    and takes it from registers; no program reads that slot from the pool.

    Args:
      q: [B, H, D]; k_new, v_new: [B, K, D], all in the pool's dtype.
      k_pages, v_pages, block_tables, lengths, tunables, layer, page_layout: as
        ``triton_paged_decode_attention``; ``lengths`` counts the new token.

    Returns:
      (out [B, H, D] in q's dtype, k_pages, v_pages with the new tokens written). Under a
      jit whose pool is donated and threaded through (the serving engine's step), the
      pools are updated in place; otherwise XLA copies them first.

    Raises:
      ValueError: as ``triton_paged_decode_attention``, and when ``k_new``/``v_new`` are
        not ``[B, K, D]`` in the pool's dtype.
    """
    launch = _checked_launch(q, k_pages, v_pages, block_tables, lengths,
                             page_layout=page_layout, layer=layer, block_tokens=block_tokens,
                             num_splits=num_splits, num_warps=num_warps,
                             num_stages=num_stages, prefetch_table=prefetch_table)
    want = (q.shape[0], launch.grid[1], q.shape[-1])  # grid: (batch, kv_heads, splits)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != want or x.dtype != k_pages.dtype:
            raise ValueError(f"{name} must be {want} {k_pages.dtype} (one token per sequence "
                             f"and KV head), got {x.shape} {x.dtype}")
    qkv = jnp.concatenate([q, k_new, v_new], axis=1)  # XLA fuses it into their producers
    return _decode_append(qkv, k_pages, v_pages, block_tables, lengths, launch=launch)


def triton_paged_decode_append_packed(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                      block_tables: jax.Array, lengths: jax.Array, *,
                                      block_tokens: int | None = None,
                                      num_splits: int | None = None, num_warps: int = 4,
                                      num_stages: int = 4, layer: int | None = None,
                                      prefetch_table: bool = True,
                                      page_layout: str = "token-major"
                                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``triton_paged_decode_append`` with q and the new K/V already packed: ``qkv``
    [B, H + 2K, D] in the pool's dtype (q heads, then K's, then V's; what
    ``pallas_kernels.triton_fused_layer.norm_qkv_rope`` writes), K the pool's KV heads;
    handed to the kernel as it is. Same settings, returns and errors."""
    if qkv.ndim != 3 or k_pages.ndim < 4:
        raise ValueError(f"qkv must be [B, H + 2K, D] and the pools [(L,) P, S, K, D], got "
                         f"{qkv.shape} and {k_pages.shape}")
    kv_heads = k_pages.shape[-2] if page_layout == "token-major" else k_pages.shape[-3]
    heads = qkv.shape[1] - 2 * kv_heads
    if heads < kv_heads:
        raise ValueError(f"qkv has {qkv.shape[1]} heads, fewer than the pool's 3 * {kv_heads} "
                         f"K/V heads need")
    q = jax.ShapeDtypeStruct((qkv.shape[0], heads, qkv.shape[2]), qkv.dtype)
    launch = _checked_launch(q, k_pages, v_pages, block_tables, lengths,  # type: ignore[arg-type]
                             page_layout=page_layout, layer=layer, block_tokens=block_tokens,
                             num_splits=num_splits, num_warps=num_warps,
                             num_stages=num_stages, prefetch_table=prefetch_table)
    return _decode_append(qkv, k_pages, v_pages, block_tables, lengths, launch=launch)
