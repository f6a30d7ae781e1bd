"""L2 of the KV hierarchy: a fixed pool of page slots in host (NumPy) memory.

A slot holds one device page of every layer, K and V: arrays
``[num_slots, L, S, K, D]`` in the device pages' dtype (bfloat16 through
``ml_dtypes``).  ``demote``/``promote`` move pages between a
:class:`~kvjax.cache.paged.PagedCache` (``[L, P, S, K, D]``) and host arrays
``[n, L, S, K, D]``; ``HostPool.save_pages``/``restore_pages`` do the same
through the pool's slots and time every copy for the bandwidth stats.  Page counts
are padded to a power of two inside the copies (repeating the first page), so a run
that moves many different numbers of pages compiles a handful of copy programs.

Staging (``STAGING``): ``"pageable"`` hands NumPy arrays to ``jax.device_put`` /
``jax.device_get`` directly; ``"pinned"`` passes every copy through a buffer in the
device's ``pinned_host`` memory (page-locked, so the copy engine can DMA it), then copies
that buffer to or from the NumPy slots on the host; ``"pinned-slots"`` keeps every
slot's K and V as JAX arrays in ``pinned_host`` memory, so a copy either way is one
batch of DMAs (``jax.device_put`` of the per-page arrays) plus one gather or scatter
on the device, with no host-side copy at all. NumPy views of the slots (``load``, the
disk tier) are made on demand.

Blocks leave the pool as ``Block`` pairs ``(k, v)`` of one page each, ``[L, S, K, D]``:
NumPy arrays, or pinned JAX arrays for ``"pinned-slots"``; ``promote_blocks`` takes
any mix of the two.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import PagedCache

STAGING = ("pageable", "pinned", "pinned-slots")
Block = tuple[Any, Any]  # one page's (k, v) [L, S, K, D]: NumPy or pinned JAX arrays


class HostPoolError(RuntimeError):
    """Base class of host-pool errors."""


class HostPoolFullError(HostPoolError):
    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} host slots, {free} free")
        self.needed, self.free = needed, free


class InvalidSlotError(HostPoolError, ValueError):
    """A slot id out of range, repeated, or not allocated."""


@dataclasses.dataclass
class HostPoolStats:
    bytes_to_host: int = 0  # device -> host
    bytes_to_device: int = 0  # host -> device
    seconds_to_host: float = 0.0
    seconds_to_device: float = 0.0

    @property
    def gbps_to_host(self) -> float:
        return self.bytes_to_host / self.seconds_to_host / 1e9 if self.seconds_to_host else 0.0

    @property
    def gbps_to_device(self) -> float:
        return (self.bytes_to_device / self.seconds_to_device / 1e9
                if self.seconds_to_device else 0.0)


def _ids(page_ids: Iterable[Any], pages: PagedCache, *, distinct: bool = False) -> np.ndarray:
    """``page_ids`` as int32 [n]; ValueError if one is outside the pool (or repeats, when
    the copy writes them: ``distinct``)."""
    ids = np.asarray(list(page_ids), dtype=np.int32).reshape(-1)
    if distinct and len(set(ids.tolist())) != len(ids):
        raise ValueError(f"duplicate page id in {ids.tolist()}")
    if ids.size and (ids.min() < 0 or ids.max() >= pages.num_pages):
        raise ValueError(f"page ids {ids.tolist()} out of range [0, {pages.num_pages})")
    return ids


def _padded(x: np.ndarray) -> np.ndarray:
    """``x`` (non-empty) with its first entry repeated up to a power-of-two length."""
    n = 1 << (len(x) - 1).bit_length()
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)]) if n > len(x) else x


def check_staging(staging: str, device: jax.Device | None = None) -> None:
    """ValueError unless ``staging`` is in ``STAGING`` (and, for ``"pinned"``, ``device``
    has a ``pinned_host`` memory)."""
    if staging not in STAGING:
        raise ValueError(f"staging must be one of {STAGING}, got {staging!r}")
    if staging != "pageable" and device is not None and "pinned_host" not in {
            m.kind for m in device.addressable_memories()}:
        raise ValueError(f"device {device} has no pinned_host memory: use staging='pageable'")


def _device_of(pages: PagedCache) -> jax.Device:
    return next(iter(pages.k_pages.devices()))


def _memory(device: jax.Device, kind: str) -> jax.sharding.SingleDeviceSharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def demote(pages: PagedCache, page_ids: Iterable[Any], *,
           staging: str = "pageable") -> tuple[np.ndarray, np.ndarray]:
    """Host copies ``(k, v)`` ``[n, L, S, K, D]`` of device pages ``page_ids`` (blocking)."""
    device = _device_of(pages)
    check_staging(staging, device)
    ids = _ids(page_ids, pages)
    if not ids.size:
        shape = (0, *pages.k_pages.shape[:1], *pages.k_pages.shape[2:])
        return np.zeros(shape, pages.k_pages.dtype), np.zeros(shape, pages.v_pages.dtype)
    padded = jnp.asarray(_padded(ids))
    kv = (_gather(pages.k_pages, padded), _gather(pages.v_pages, padded))
    if staging == "pinned":
        kv = jax.device_put(kv, _memory(device, "pinned_host"))
    k, v = jax.device_get(kv)
    return np.asarray(k)[: len(ids)], np.asarray(v)[: len(ids)]


@jax.jit
def _gather(arr: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.moveaxis(arr[:, ids], 1, 0)


@partial(jax.jit, donate_argnums=(0, 1))
def _scatter(k_pages: jax.Array, v_pages: jax.Array, ids: jax.Array, k: jax.Array,
             v: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (k_pages.at[:, ids].set(jnp.moveaxis(k, 0, 1).astype(k_pages.dtype)),
            v_pages.at[:, ids].set(jnp.moveaxis(v, 0, 1).astype(v_pages.dtype)))


def promote(pages: PagedCache, page_ids: Iterable[Any], k: np.ndarray,
            v: np.ndarray, *, staging: str = "pageable") -> PagedCache:
    """A new cache with device pages ``page_ids`` set to host ``k``/``v`` ``[n, L, S, K, D]``.

    The old cache's page buffers are donated: do not use ``pages`` afterwards.
    ``page_ids`` must be distinct.
    """
    device = _device_of(pages)
    check_staging(staging, device)
    ids = _ids(page_ids, pages, distinct=True)
    shape = (len(ids), *pages.k_pages.shape[:1], *pages.k_pages.shape[2:])
    if k.shape != shape or v.shape != shape:
        raise ValueError(f"k/v must be {shape}, got {k.shape} and {v.shape}")
    if k.dtype != pages.k_pages.dtype or v.dtype != pages.v_pages.dtype:
        raise ValueError(f"dtype mismatch: pages {pages.k_pages.dtype}, got {k.dtype}/{v.dtype}")
    if not len(ids):
        return pages
    # Padding repeats the first (page, data) pair: a duplicate write of equal values.
    kv: Any = (_padded(k), _padded(v))
    if staging == "pinned":
        kv = jax.device_put(jax.device_put(kv, _memory(device, "pinned_host")),
                            _memory(device, "device"))
    new_k, new_v = _scatter(pages.k_pages, pages.v_pages, jnp.asarray(_padded(ids)), *kv)
    return dataclasses.replace(pages, k_pages=new_k, v_pages=new_v)


def demote_blocks(pages: PagedCache, page_ids: Sequence[int]) -> list[Block]:
    """Pinned-host copies of device pages ``page_ids``, one ``(k, v)`` pair of
    ``[L, S, K, D]`` arrays in the device's ``pinned_host`` memory per page: one gather
    program on the device, then one batch of device -> host DMAs (blocking)."""
    device = _device_of(pages)
    check_staging("pinned-slots", device)
    ids = _ids(page_ids, pages)
    if not ids.size:
        return []
    ks, vs = _split_pages(pages.k_pages, pages.v_pages, jnp.asarray(ids))
    host = jax.device_put((ks, vs), _memory(device, "pinned_host"))
    jax.block_until_ready(host)
    return list(zip(host[0], host[1], strict=True))


@jax.jit
def _split_pages(k_pages: jax.Array, v_pages: jax.Array, ids: jax.Array
                 ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Pages ``ids`` of both pools as separate [L, S, K, D] arrays (one program per count)."""
    return (tuple(k_pages[:, i] for i in ids), tuple(v_pages[:, i] for i in ids))


@partial(jax.jit, donate_argnums=(0, 1))
def _scatter_blocks(k_pages: jax.Array, v_pages: jax.Array, ids: jax.Array,
                    ks: tuple[jax.Array, ...], vs: tuple[jax.Array, ...]
                    ) -> tuple[jax.Array, jax.Array]:
    k, v = jnp.stack(ks, axis=1), jnp.stack(vs, axis=1)  # [L, n, S, K, D]
    return (k_pages.at[:, ids].set(k.astype(k_pages.dtype)),
            v_pages.at[:, ids].set(v.astype(v_pages.dtype)))


def promote_blocks(pages: PagedCache, page_ids: Sequence[int],
                   blocks: Sequence[Block]) -> PagedCache:
    """A new cache with device pages ``page_ids`` set to ``blocks`` (per-page ``(k, v)``
    ``[L, S, K, D]``, NumPy or pinned JAX arrays, in any mix): one batch of host -> device
    copies, then one scatter program (per power-of-two count: padding repeats the first
    pair). Donates ``pages``'s buffers; ``page_ids`` must be distinct."""
    device = _device_of(pages)
    ids = _ids(page_ids, pages, distinct=True)
    shape = (*pages.k_pages.shape[:1], *pages.k_pages.shape[2:])
    if len(blocks) != len(ids):
        raise ValueError(f"{len(ids)} page ids but {len(blocks)} blocks")
    for k, v in blocks:
        if k.shape != shape or v.shape != shape:
            raise ValueError(f"blocks must be {shape}, got {k.shape} and {v.shape}")
        if k.dtype != pages.k_pages.dtype or v.dtype != pages.v_pages.dtype:
            raise ValueError(f"dtype mismatch: pages {pages.k_pages.dtype}, got "
                             f"{k.dtype}/{v.dtype}")
    if not len(ids):
        return pages
    ks, vs = jax.device_put(([k for k, _ in blocks], [v for _, v in blocks]),
                            _memory(device, "device"))
    pad = (1 << (len(ids) - 1).bit_length()) - len(ids)
    new_k, new_v = _scatter_blocks(pages.k_pages, pages.v_pages, jnp.asarray(_padded(ids)),
                                   tuple(ks + ks[:1] * pad), tuple(vs + vs[:1] * pad))
    return dataclasses.replace(pages, k_pages=new_k, v_pages=new_v)


class HostPool:
    """``num_slots`` host slots of one page (all layers, K and V) each, with a free list;
    copies to and from device pages go through ``staging`` (one of ``STAGING``)."""

    def __init__(self, num_slots: int, num_layers: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: Any, *, staging: str = "pageable",
                 device: jax.Device | None = None) -> None:
        check_staging(staging)
        dims = (num_slots, num_layers, page_size, num_kv_heads, head_dim)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims[1:]) or (
                isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0):
            raise ValueError(f"bad host pool dimensions {dims}")
        self.num_slots = num_slots
        self.staging = staging
        self.dtype = np.dtype(dtype)
        self._slot_shape = dims[1:]
        self.device = device or jax.devices()[0]  # whose pinned_host memory holds the slots
        resident = staging == "pinned-slots"
        numpy_dims = (0, *dims[1:]) if resident else dims
        self.k = np.zeros(numpy_dims, self.dtype)  # the NumPy slots (none when resident)
        self.v = np.zeros(numpy_dims, self.dtype)
        self._blocks: list[Block | None] = [None] * num_slots if resident else []
        self._free: deque[int] = deque(range(num_slots))
        self._used = np.zeros(num_slots, bool)
        self.stats = HostPoolStats()

    @classmethod
    def like(cls, pages: PagedCache, num_slots: int, *,
             staging: str = "pageable") -> HostPool:
        """A pool whose slots match the pages of ``pages``."""
        check_staging(staging, _device_of(pages))
        num_layers, _, page_size, kv_heads, head_dim = pages.k_pages.shape
        return cls(num_slots, int(num_layers), int(page_size), int(kv_heads), int(head_dim),
                   pages.k_pages.dtype, staging=staging, device=_device_of(pages))

    @property
    def slot_shape(self) -> tuple[int, ...]:
        return tuple(self._slot_shape)

    @property
    def resident(self) -> bool:
        """Slots held as pinned JAX arrays (``"pinned-slots"``), not NumPy."""
        return self.staging == "pinned-slots"

    @property
    def slot_bytes(self) -> int:
        return 2 * int(np.prod(self.slot_shape)) * self.dtype.itemsize

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.num_slots and bool(self._used[slot])

    # ------------------------------------------------------------------ slots
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free slots; ``HostPoolFullError`` (nothing taken) if too few."""
        if n > len(self._free):
            raise HostPoolFullError(n, len(self._free))
        out = [self._free.popleft() for _ in range(n)]
        self._used[out] = True
        return out

    def free(self, slot_ids: Iterable[int]) -> None:
        ids = self._check(slot_ids)
        self._used[ids] = False
        self._free.extend(ids)
        for s in ids if self.resident else ():
            self._blocks[s] = None

    def _check(self, slot_ids: Iterable[Any]) -> list[int]:
        ids = [int(s) for s in slot_ids]
        if len(set(ids)) != len(ids):
            raise InvalidSlotError(f"duplicate slot in {ids}")
        bad = [s for s in ids if not self.is_allocated(s)]
        if bad:
            raise InvalidSlotError(f"slots {bad} are not allocated")
        return ids

    # ------------------------------------------------------------------ data
    def store(self, slot_ids: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Write ``k``/``v`` ``[n, L, S, K, D]`` into allocated slots ``slot_ids``."""
        ids = self._check(slot_ids)
        shape = (len(ids), *self.slot_shape)
        if k.shape != shape or v.shape != shape:
            raise ValueError(f"k/v must be {shape}, got {k.shape} and {v.shape}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"dtype must be {self.dtype}, got {k.dtype}/{v.dtype}")
        if self.resident:
            self.put(ids, list(zip(k, v, strict=True)))
            return
        self.k[ids] = k
        self.v[ids] = v

    def load(self, slot_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copies ``(k, v)`` ``[n, L, S, K, D]`` of allocated slots ``slot_ids``."""
        ids = self._check(slot_ids)
        if self.resident:
            blocks = self.take(ids)
            if not blocks:
                shape = (0, *self.slot_shape)
                return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
            return (np.stack([np.asarray(k) for k, _ in blocks]),
                    np.stack([np.asarray(v) for _, v in blocks]))
        return self.k[ids], self.v[ids]  # fancy indexing copies

    def put(self, slot_ids: Sequence[int], blocks: Sequence[Block]) -> None:
        """Write per-page ``(k, v)`` ``[L, S, K, D]`` blocks (NumPy or pinned JAX arrays)
        into allocated slots; a pinned block is kept as it is (no copy)."""
        ids = self._check(slot_ids)
        if len(blocks) != len(ids):
            raise ValueError(f"{len(ids)} slots but {len(blocks)} blocks")
        for k, v in blocks:
            if k.shape != self.slot_shape or v.shape != self.slot_shape:
                raise ValueError(f"blocks must be {self.slot_shape}, got {k.shape}/{v.shape}")
            if k.dtype != self.dtype or v.dtype != self.dtype:
                raise ValueError(f"dtype must be {self.dtype}, got {k.dtype}/{v.dtype}")
        if not self.resident:
            for s, (k, v) in zip(ids, blocks, strict=True):
                self.k[s], self.v[s] = np.asarray(k), np.asarray(v)
            return
        numpy = [i for i, (k, _) in enumerate(blocks) if not isinstance(k, jax.Array)]
        placed = list(blocks)
        if numpy:  # host data from elsewhere (the disk tier): into pinned memory
            moved = jax.device_put([blocks[i] for i in numpy], self._pinned)
            for i, block in zip(numpy, moved, strict=True):
                placed[i] = tuple(block)
        for s, block in zip(ids, placed, strict=True):
            self._blocks[s] = block

    def take(self, slot_ids: Sequence[int]) -> list[Block]:
        """The slots' blocks, safe to keep after the slots are freed: copies of NumPy
        slots, the (immutable) pinned arrays themselves for ``"pinned-slots"``."""
        ids = self._check(slot_ids)
        if not self.resident:
            return [(self.k[s].copy(), self.v[s].copy()) for s in ids]
        out = []
        for s in ids:
            block = self._blocks[s]
            if block is None:
                raise InvalidSlotError(f"slot {s} holds no data")
            out.append(block)
        return out

    @property
    def _pinned(self) -> jax.sharding.SingleDeviceSharding:
        return _memory(self.device, "pinned_host")

    def copy_out(self, pages: PagedCache, page_ids: Sequence[int]) -> list[Block]:
        """Device pages -> per-page blocks in this pool's staging (timed; blocking): NumPy
        rows, or pinned arrays for ``"pinned-slots"``. Not stored in any slot."""
        t0 = time.perf_counter()
        if self.resident:
            blocks = demote_blocks(pages, page_ids)
        else:
            k, v = demote(pages, page_ids, staging=self.staging)
            blocks = list(zip(k, v, strict=True))
        self.stats.seconds_to_host += time.perf_counter() - t0
        self.stats.bytes_to_host += len(blocks) * self.slot_bytes
        return blocks

    def copy_in(self, pages: PagedCache, page_ids: Sequence[int],
                blocks: Sequence[Block]) -> PagedCache:
        """Per-page blocks -> device pages (timed; blocks until written); donates
        ``pages``. NumPy blocks go through this pool's staging."""
        if len(blocks) != len(page_ids):
            raise ValueError(f"{len(page_ids)} page ids but {len(blocks)} blocks")
        t0 = time.perf_counter()
        if self.resident or not blocks:
            out = promote_blocks(pages, page_ids, blocks)
        else:
            k = np.stack([np.asarray(b[0]) for b in blocks])
            v = np.stack([np.asarray(b[1]) for b in blocks])
            out = promote(pages, page_ids, k, v, staging=self.staging)
        jax.block_until_ready((out.k_pages, out.v_pages))
        self.stats.seconds_to_device += time.perf_counter() - t0
        self.stats.bytes_to_device += len(blocks) * self.slot_bytes
        return out

    def save_pages(self, pages: PagedCache, page_ids: Sequence[int],
                   slot_ids: Sequence[int]) -> None:
        """Device pages -> host slots (timed)."""
        self._check(slot_ids)
        self.put(slot_ids, self.copy_out(pages, page_ids))

    def restore_pages(self, pages: PagedCache, slot_ids: Sequence[int],
                      page_ids: Sequence[int]) -> PagedCache:
        """Host slots -> device pages (timed; blocks until written); donates ``pages``."""
        if self.resident:
            return self.copy_in(pages, page_ids, self.take(slot_ids))
        t0 = time.perf_counter()
        k, v = self.load(slot_ids)  # one gather copy of the NumPy slots
        out = promote(pages, page_ids, k, v, staging=self.staging)
        jax.block_until_ready((out.k_pages, out.v_pages))
        self.stats.seconds_to_device += time.perf_counter() - t0
        self.stats.bytes_to_device += k.nbytes + v.nbytes
        return out
