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
that buffer to or from the NumPy slots on the host.
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

STAGING = ("pageable", "pinned")


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


def _ids(page_ids: Iterable[Any]) -> np.ndarray:
    return np.asarray(list(page_ids), dtype=np.int32).reshape(-1)


def _padded(x: np.ndarray) -> np.ndarray:
    """``x`` (non-empty) with its first entry repeated up to a power-of-two length."""
    n = 1 << (len(x) - 1).bit_length()
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)]) if n > len(x) else x


def check_staging(staging: str, device: jax.Device | None = None) -> None:
    """ValueError unless ``staging`` is in ``STAGING`` (and, for ``"pinned"``, ``device``
    has a ``pinned_host`` memory)."""
    if staging not in STAGING:
        raise ValueError(f"staging must be one of {STAGING}, got {staging!r}")
    if staging == "pinned" and device is not None and "pinned_host" not in {
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
    ids = _ids(page_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= pages.num_pages):
        raise ValueError(f"page ids {ids.tolist()} out of range [0, {pages.num_pages})")
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
    ids = _ids(page_ids)
    shape = (len(ids), *pages.k_pages.shape[:1], *pages.k_pages.shape[2:])
    if k.shape != shape or v.shape != shape:
        raise ValueError(f"k/v must be {shape}, got {k.shape} and {v.shape}")
    if k.dtype != pages.k_pages.dtype or v.dtype != pages.v_pages.dtype:
        raise ValueError(f"dtype mismatch: pages {pages.k_pages.dtype}, got {k.dtype}/{v.dtype}")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"duplicate page id in {ids.tolist()}")
    if ids.size and (ids.min() < 0 or ids.max() >= pages.num_pages):
        raise ValueError(f"page ids {ids.tolist()} out of range [0, {pages.num_pages})")
    if not len(ids):
        return pages
    # Padding repeats the first (page, data) pair: a duplicate write of equal values.
    kv: Any = (_padded(k), _padded(v))
    if staging == "pinned":
        kv = jax.device_put(jax.device_put(kv, _memory(device, "pinned_host")),
                            _memory(device, "device"))
    new_k, new_v = _scatter(pages.k_pages, pages.v_pages, jnp.asarray(_padded(ids)), *kv)
    return dataclasses.replace(pages, k_pages=new_k, v_pages=new_v)


class HostPool:
    """``num_slots`` host slots of one page (all layers, K and V) each, with a free list;
    copies to and from device pages go through ``staging`` (one of ``STAGING``)."""

    def __init__(self, num_slots: int, num_layers: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: Any, *, staging: str = "pageable") -> None:
        check_staging(staging)
        dims = (num_slots, num_layers, page_size, num_kv_heads, head_dim)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims[1:]) or (
                isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0):
            raise ValueError(f"bad host pool dimensions {dims}")
        self.num_slots = num_slots
        self.staging = staging
        self.dtype = np.dtype(dtype)
        self.k = np.zeros(dims, self.dtype)
        self.v = np.zeros(dims, self.dtype)
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
                   pages.k_pages.dtype, staging=staging)

    @property
    def slot_shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape[1:])

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
        self.k[ids] = k
        self.v[ids] = v

    def load(self, slot_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copies ``(k, v)`` ``[n, L, S, K, D]`` of allocated slots ``slot_ids``."""
        ids = self._check(slot_ids)
        return self.k[ids], self.v[ids]  # fancy indexing copies

    def save_pages(self, pages: PagedCache, page_ids: Sequence[int],
                   slot_ids: Sequence[int]) -> None:
        """Device pages -> host slots (timed)."""
        self._check(slot_ids)
        t0 = time.perf_counter()
        k, v = demote(pages, page_ids, staging=self.staging)
        self.store(slot_ids, k, v)
        self.stats.seconds_to_host += time.perf_counter() - t0
        self.stats.bytes_to_host += k.nbytes + v.nbytes

    def restore_pages(self, pages: PagedCache, slot_ids: Sequence[int],
                      page_ids: Sequence[int]) -> PagedCache:
        """Host slots -> device pages (timed; blocks until written); donates ``pages``."""
        t0 = time.perf_counter()
        k, v = self.load(slot_ids)
        out = promote(pages, page_ids, k, v, staging=self.staging)
        jax.block_until_ready((out.k_pages, out.v_pages))
        self.stats.seconds_to_device += time.perf_counter() - t0
        self.stats.bytes_to_device += k.nbytes + v.nbytes
        return out
