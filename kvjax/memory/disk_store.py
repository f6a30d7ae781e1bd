"""L3 of the KV hierarchy: persistent per-block K/V entries on local disk.

One entry = one block (page) of every layer, K and V, stored under its chained
block key (:mod:`kvjax.memory.block_hash`).  File format, one file per entry::

    b"KVJXBLK1" | uint32 header length | JSON header | K bytes | V bytes

The header records the key, dtype, shape and the SHA-256 of ``K bytes + V
bytes``; a read whose key, sizes or checksum disagree is a *miss* with a
reason (``missing``, ``truncated``, ``corrupt``, ``checksum``, ``key``,
``shape``, ``io``), never wrong data; a damaged file is removed, so a later
``put`` of the block stores it afresh.  Files are written to a temp file in the
same directory, fsync'ed and ``os.replace``'d into place, so a reader (in this
or another process) sees either no entry or a complete one.

Why not Orbax / tensorstore: an entry is one small block (tens of KiB to a few
MiB); an Orbax checkpoint is a directory of several files per save, with
asynchronous commit machinery and per-save latency of milliseconds, built for
big sharded pytrees.  Per block that is many files and much overhead for no
gain, and it would still need its own checksum.  A single raw file per block
with an atomic rename is simpler, one ``open`` per get, and easy to verify.

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
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

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
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.enabled = True
        self.disabled_reason: str | None = None
        self.stats = DiskStoreStats()
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.root)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            self._disable(f"cannot write to {self.root}: {err}")

    def _disable(self, reason: str) -> None:
        if self.enabled:
            warnings.warn(f"DiskStore disabled, KV blocks will not be stored on disk: {reason}",
                          RuntimeWarning, stacklevel=3)
        self.enabled = False
        self.disabled_reason = reason

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"key must be a 64-digit lowercase hex SHA-256, got {key!r}")
        return self.root / key[:2] / (key + _SUFFIX)

    def contains(self, key: str) -> bool:
        """Whether an entry file exists (a later ``get`` may still find it corrupt)."""
        return self.enabled and self.path(key).is_file()

    def _miss(self, reason: str) -> None:
        self.stats.misses += 1
        self.stats.miss_reasons[reason] += 1

    # ------------------------------------------------------------------ write
    def put(self, key: str, k: np.ndarray, v: np.ndarray, *, overwrite: bool = False) -> bool:
        """Store one block; return whether a file was written.

        An existing entry is kept unless ``overwrite`` (the key determines the
        tokens, so the data should be the same).
        """
        path = self.path(key)
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v differ: {k.dtype}{k.shape} vs {v.dtype}{v.shape}")
        with self._lock:
            if not self.enabled:
                return False
            if not overwrite and path.is_file():
                self.stats.put_skipped += 1
                return False
            t0 = time.perf_counter()
            payload = k.tobytes() + v.tobytes()
            header = json.dumps({"key": key, "dtype": k.dtype.name, "shape": list(k.shape),
                                 "nbytes": len(payload),
                                 "sha256": hashlib.sha256(payload).hexdigest()}).encode()
            tmp = None
            try:
                path.parent.mkdir(exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + struct.pack("<I", len(header)) + header)
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
            except OSError as err:
                self._disable(f"put failed in {self.root}: {err}")
                return False
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            self.stats.puts += 1
            self.stats.bytes_written += len(payload)
            self.stats.seconds_written += time.perf_counter() - t0
            return True

    # ------------------------------------------------------------------ read
    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(k, v)`` of ``key``, or ``None`` (a counted miss with a reason)."""
        path = self.path(key)
        with self._lock:
            if not self.enabled:
                self._miss("disabled")
                return None
            t0 = time.perf_counter()
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                self._miss("missing")
                return None
            except OSError:
                self._miss("io")
                return None
            out = self._decode(key, data)
            if isinstance(out, str):
                self._miss(out)
                with contextlib.suppress(OSError):  # a later put may store it afresh
                    path.unlink()
                return None
            self.stats.hits += 1
            self.stats.bytes_read += out[0].nbytes + out[1].nbytes
            self.stats.seconds_read += time.perf_counter() - t0
            return out

    @staticmethod
    def _decode(key: str, data: bytes) -> tuple[np.ndarray, np.ndarray] | str:
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
        payload = data[head + hlen :]
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

    def delete(self, key: str) -> bool:
        """Remove an entry; return whether one existed."""
        with self._lock:
            try:
                self.path(key).unlink()
            except OSError:
                return False
            return True

    def stored_keys(self) -> list[str]:
        """Keys of the entry files present (not verified)."""
        if not self.enabled:
            return []
        return sorted(p.name[: -len(_SUFFIX)] for p in self.root.glob("??/*" + _SUFFIX)
                      if _KEY_RE.match(p.name[: -len(_SUFFIX)]))
