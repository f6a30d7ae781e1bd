"""L3 of the KV hierarchy: persistent per-block K/V entries on local disk.

One entry = one block (page) of every layer, K and V, stored under its chained
block key (:mod:`kvjax.memory.block_hash`) as one blob at ``<key[:2]>/<key>.kvb``::

    b"KVJXBLK1" | uint32 header length | JSON header | K bytes | V bytes

The header records the key, dtype, shape and the SHA-256 of ``K bytes + V
bytes``; a read whose key, sizes or checksum disagree is a *miss* with a
reason (``missing``, ``truncated``, ``corrupt``, ``checksum``, ``key``,
``shape``, ``io``), never wrong data; a damaged entry is removed, so a later
``put`` of the block stores it afresh.

The bytes go through a :mod:`kvjax.memory.blob_store` backend, picked by
``backend``: ``raw`` (plain files, temp file + fsync + ``os.replace``) or
``tensorstore`` (TensorStore's ``file`` kvstore, which writes a lock file, fsyncs
and renames it into place).  Either way a reader (in this or another process) sees
no entry or a complete one, and both lay out the same files, so a directory
written by one is read by the other.  The entry format, checksum, miss reasons and
failure handling live here, once, for both.

Default ``raw`` (``DEFAULT_BACKEND``), by measurement (``benchmarks/disk_store_bench.py``;
``docs/tiered-cache.md``, "L3 backend: raw files vs tensorstore"): both backends pass
every correctness test and put at the same speed (two fsyncs dominate: about 8 ms per
8-96 KiB entry, 20-24 ms per 2 MiB on the CPU test machine), but raw reads are faster:
get p50 95 vs 116 us (8 KiB), 277 vs 359 us (96 KiB), 2.2 vs 2.9 ms (2 MiB), get p99
at 8-96 KiB 0.2-0.7 ms vs 3.4-5.7 ms, and ``contains`` about half the time (18-39 vs
34-74 us).  TensorStore (a Flax dependency) is imported only when its backend is picked.

Failures never break the cache: if the directory cannot be created or
written at construction, or a ``put`` hits an ``OSError`` (disk full,
permissions), one ``warnings.warn`` is issued and the store disables itself:
later puts are no-ops and gets miss (reason ``disabled``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from kvjax.memory.blob_store import open_blobs

DEFAULT_BACKEND = "raw"
_MAGIC = b"KVJXBLK1"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".kvb"


def _dtype_from_name(name: str) -> np.dtype:
    ext = getattr(ml_dtypes, name, None)
    return np.dtype(ext) if ext is not None else np.dtype(name)


@dataclass
class DiskStoreStats:
    puts: int = 0
    put_skipped: int = 0  # entry already present, not rewritten
    hits: int = 0
    misses: int = 0
    miss_reasons: Counter[str] = field(default_factory=Counter)
    bytes_written: int = 0
    bytes_read: int = 0
    seconds_written: float = 0.0  # time in puts that wrote a file
    seconds_read: float = 0.0  # time in gets that hit (read + verify)


class DiskStore:
    """Block-keyed K/V entries in ``root`` (safe to share between processes).

    ``put(key, k, v)`` stores two arrays of equal shape and dtype; ``get(key)``
    returns fresh ``(k, v)`` arrays or ``None``.  Thread safe (one lock).
    ``backend`` is one of ``blob_store.BACKENDS`` (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike[str], backend: str = DEFAULT_BACKEND) -> None:
        self.root = Path(root)
        self.backend = backend
        self.enabled = True
        self.disabled_reason: str | None = None
        self.stats = DiskStoreStats()
        self._lock = threading.Lock()
        try:
            self._blobs = open_blobs(backend, self.root)  # ValueError: unknown backend
            self.root.mkdir(parents=True, exist_ok=True)
            probe = f".probe-{uuid.uuid4().hex}"
            self._blobs.write(probe, b"x")
            self._blobs.delete(probe)
        except OSError as err:
            self._disable(f"cannot write to {self.root}: {err}")

    def _disable(self, reason: str) -> None:
        if self.enabled:
            warnings.warn(f"DiskStore disabled, KV blocks will not be stored on disk: {reason}",
                          RuntimeWarning, stacklevel=3)
        self.enabled = False
        self.disabled_reason = reason

    @staticmethod
    def _name(key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"key must be a 64-digit lowercase hex SHA-256, got {key!r}")
        return f"{key[:2]}/{key}{_SUFFIX}"

    def path(self, key: str) -> Path:
        """The file holding ``key``'s entry (the same for every backend)."""
        return self.root / self._name(key)

    def contains(self, key: str) -> bool:
        """Whether an entry exists (a later ``get`` may still find it corrupt)."""
        name = self._name(key)
        return self.enabled and self._blobs.exists(name)

    def _miss(self, reason: str) -> None:
        self.stats.misses += 1
        self.stats.miss_reasons[reason] += 1

    # ------------------------------------------------------------------ write
    def put(self, key: str, k: np.ndarray, v: np.ndarray, *, overwrite: bool = False) -> bool:
        """Store one block; return whether an entry was written.

        An existing entry is kept unless ``overwrite`` (the key determines the
        tokens, so the data should be the same).
        """
        name = self._name(key)
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v differ: {k.dtype}{k.shape} vs {v.dtype}{v.shape}")
        with self._lock:
            if not self.enabled:
                return False
            if not overwrite and self._blobs.exists(name):
                self.stats.put_skipped += 1
                return False
            t0 = time.perf_counter()
            payload = k.tobytes() + v.tobytes()
            try:
                self._blobs.write(name, _encode(key, k, payload))
            except OSError as err:
                self._disable(f"put failed in {self.root}: {err}")
                return False
            self.stats.puts += 1
            self.stats.bytes_written += len(payload)
            self.stats.seconds_written += time.perf_counter() - t0
            return True

    # ------------------------------------------------------------------ read
    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(k, v)`` of ``key``, or ``None`` (a counted miss with a reason)."""
        name = self._name(key)
        with self._lock:
            if not self.enabled:
                self._miss("disabled")
                return None
            t0 = time.perf_counter()
            try:
                data = self._blobs.read(name)
            except FileNotFoundError:
                self._miss("missing")
                return None
            except OSError:
                self._miss("io")
                return None
            out = _decode(key, data)
            if isinstance(out, str):
                self._miss(out)
                with contextlib.suppress(OSError):  # a later put may store it afresh
                    self._blobs.delete(name)
                return None
            self.stats.hits += 1
            self.stats.bytes_read += out[0].nbytes + out[1].nbytes
            self.stats.seconds_read += time.perf_counter() - t0
            return out

    def delete(self, key: str) -> bool:
        """Remove an entry; return whether one existed."""
        name = self._name(key)
        with self._lock:
            if not self.enabled or not self._blobs.exists(name):
                return False
            try:
                self._blobs.delete(name)
            except OSError:
                return False
            return True

    def stored_keys(self) -> list[str]:
        """Keys of the entries present (not verified)."""
        if not self.enabled:
            return []
        keys = (name.rpartition("/")[2][: -len(_SUFFIX)] for name in self._blobs.names()
                if name.endswith(_SUFFIX))
        return sorted(key for key in keys if _KEY_RE.match(key))


def _encode(key: str, k: np.ndarray, payload: bytes) -> bytes:
    """One entry's bytes: magic, header (key, dtype, shape, size, SHA-256), payload."""
    header = json.dumps({"key": key, "dtype": k.dtype.name, "shape": list(k.shape),
                         "nbytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + payload


def _decode(key: str, data: bytes) -> tuple[np.ndarray, np.ndarray] | str:
    """``(k, v)`` of an entry's bytes, or the miss reason why they are not ``key``'s."""
    head = len(_MAGIC) + 4
    if len(data) < head:
        return "truncated"
    if data[: len(_MAGIC)] != _MAGIC:
        return "corrupt"
    (hlen,) = struct.unpack("<I", data[len(_MAGIC) : head])
    if len(data) < head + hlen:
        return "truncated"
    try:
        header = json.loads(data[head : head + hlen])
        dtype = _dtype_from_name(str(header["dtype"]))
        shape = tuple(int(s) for s in header["shape"])
        nbytes, digest, stored_key = int(header["nbytes"]), str(header["sha256"]), header["key"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "corrupt"
    if stored_key != key:
        return "key"
    payload = memoryview(data)[head + hlen :]
    if len(payload) < nbytes:
        return "truncated"
    if len(payload) != nbytes:
        return "corrupt"
    half = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if 2 * half != nbytes:
        return "shape"
    if hashlib.sha256(payload).hexdigest() != digest:
        return "checksum"
    k = np.frombuffer(payload, dtype, count=half // dtype.itemsize).reshape(shape).copy()
    v = np.frombuffer(payload, dtype, offset=half).reshape(shape).copy()
    return k, v
