"""Byte blobs under relative names in one directory: the I/O layer of the L3 disk store.

Two interchangeable backends, chosen by name (``BACKENDS``) through :func:`open_blobs`:

* ``raw``: one plain file per name, written to a temp file in the same directory,
  fsync'ed, ``os.replace``'d into place, then the directory fsync'ed;
* ``tensorstore``: the TensorStore ``file`` key-value store (``ts.KvStore``), one file
  per name.  TensorStore writes ``<name>.__lock``, fsyncs it, renames it onto
  ``<name>`` and fsyncs the directory: the same protocol.  The plain ``file``
  kvstore is used rather than a ``zarr3`` / ``n5`` array per entry: an array is a
  metadata file plus a chunk file (two files, two reads per entry, and the atomic
  unit would be the pair), while an L3 entry is already one self-describing,
  checksummed byte string (:mod:`kvjax.memory.disk_store`).

Both give the same guarantees: a reader in any process sees either no blob or a
complete one, and a blob is durable once ``write`` returns.  Both store a name at the
same path under the root, so a directory written by one backend is read by the other.

Failures are exceptions of one kind: ``write`` / ``read`` raise ``OSError``
(``FileNotFoundError`` for a name with no blob).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

BACKENDS = ("raw", "tensorstore")
_TEMP_PREFIX = ".tmp-"


class BlobStore(Protocol):
    """Atomic byte blobs under ``/``-separated relative names in ``root``."""

    root: Path

    def write(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` (replacing any blob); ``OSError`` on failure."""
        ...

    def read(self, name: str) -> bytes:
        """The blob of ``name``; ``FileNotFoundError`` if none, ``OSError`` on failure."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` has a blob (not read or verified)."""
        ...

    def delete(self, name: str) -> None:
        """Remove the blob of ``name`` if any; ``OSError`` on failure."""
        ...

    def names(self) -> list[str]:
        """Names of every blob (in any order; may include other files in ``root``)."""
        ...


class RawBlobs:
    """One plain file per blob, written through a temp file and ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                if p.is_file() and not p.name.startswith(_TEMP_PREFIX)]


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_error(err: ValueError) -> OSError:
    """TensorStore reports failures as ``ValueError("STATUS: ... [os_error_code='N']")``."""
    code = _OS_ERROR_CODE.search(str(err))
    return OSError(int(code.group(1)) if code else errno.EIO, str(err))


class TensorStoreBlobs:
    """One file per blob through TensorStore's ``file`` key-value store."""

    def __init__(self, root: Path) -> None:
        import tensorstore as ts

        self.root = root
        self._ts = ts
        try:
            self._kv = ts.KvStore.open({"driver": "file", "path": str(root) + "/"}).result()
        except ValueError as err:
            raise _os_error(err) from err

    def write(self, name: str, data: bytes) -> None:
        try:
            self._kv.write(name, data).result()
        except ValueError as err:
            raise _os_error(err) from err

    def read(self, name: str) -> bytes:
        try:
            res = self._kv.read(name).result()
        except ValueError as err:
            raise _os_error(err) from err
        if res.state != "value":
            raise FileNotFoundError(errno.ENOENT, "no blob", name)
        return bytes(res.value)

    def exists(self, name: str) -> bool:
        try:
            return self._kv.read(name, byte_range=slice(0, 0)).result().state == "value"
        except ValueError:
            return False

    def delete(self, name: str) -> None:
        try:
            self._kv.delete_range(self._ts.KvStore.KeyRange(name, name + "\0")).result()
        except ValueError as err:
            raise _os_error(err) from err

    def names(self) -> list[str]:
        try:
            return [n.decode() for n in self._kv.list().result()]
        except ValueError:
            return []


def open_blobs(backend: str, root: Path) -> BlobStore:
    """The blob store of ``backend`` (one of ``BACKENDS``) over directory ``root``."""
    if backend == "raw":
        return RawBlobs(root)
    if backend == "tensorstore":
        return TensorStoreBlobs(root)
    raise ValueError(f"unknown disk store backend {backend!r}; known: {list(BACKENDS)}")
