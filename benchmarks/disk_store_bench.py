"""L3 disk store backends on CPU: put / get / contains latency per entry, and a restart read.

For each backend (``kvjax.memory.blob_store.BACKENDS``) and entry size, ``N`` entries of
fresh random bf16 K/V are put into a fresh directory per backend, checked with
``contains`` and read back in a shuffled order by the same store, then read again by a
new ``DiskStore`` in a new Python process (the restart; the OS page cache is warm, as
after a process restart on one machine).  Every read is checked bit-exact against what
was put.  Each op is timed alone, and the backends take turns entry by entry (rotating
who goes first), so background load on a shared machine hits both alike.  Reports
median and p99 per op and MB/s (entry bytes over the summed op times).

    python benchmarks/disk_store_bench.py [--entries 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.block_hash import block_key
from kvjax.memory.disk_store import DiskStore

# (name, per-K-or-V shape (layers, tokens, kv heads, head dim)), bf16: 2 bytes each
SIZES = (
    ("1 layer, 8 KiB", (1, 16, 2, 64)),
    ("Qwen2.5-0.5B, 96 KiB", (24, 16, 2, 64)),
    ("Llama-3-8B, 2 MiB", (32, 16, 8, 128)),
)


@dataclasses.dataclass
class Row:
    """One (backend, size) measurement; latencies in microseconds."""

    backend: str
    size: str
    entry_kib: float
    entries: int
    put_p50_us: float
    put_p99_us: float
    put_mb_s: float
    get_p50_us: float
    get_p99_us: float
    get_mb_s: float
    contains_p50_us: float
    restart_get_p50_us: float
    restart_get_p99_us: float
    restart_get_mb_s: float


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, q))


def _mb_s(nbytes: int, seconds: list[float]) -> float:
    return nbytes * len(seconds) / sum(seconds) / 1e6


def _digest(k: np.ndarray, v: np.ndarray) -> str:
    return hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest()


def read_all(roots: dict[str, str], keys: list[str]) -> dict[str, tuple[list[float], list[str]]]:
    """Time ``get`` of every key on a new store per backend (``backend -> root``), the
    backends interleaved key by key: per backend, seconds and data digests."""
    stores = {backend: DiskStore(root, backend) for backend, root in roots.items()}
    out: dict[str, tuple[list[float], list[str]]] = {b: ([], []) for b in stores}
    for i, key in enumerate(keys):
        for backend in _turn(list(stores), i):
            t0 = time.perf_counter()
            got = stores[backend].get(key)
            out[backend][0].append(time.perf_counter() - t0)
            if got is None:
                raise RuntimeError(f"{backend}: entry {key} missing on read")
            out[backend][1].append(_digest(*got))
    return out


def _turn(backends: list[str], i: int) -> list[str]:
    """The backends in the order of op ``i``: rotated each op, so none is always first."""
    j = i % len(backends)
    return backends[j:] + backends[:j]


def measure(size: str, shape: tuple[int, ...], entries: int, tmp: Path,
            rng: np.random.Generator) -> list[Row]:
    """Put ``entries`` fresh entries into a fresh directory per backend, check ``contains``
    and read them back (same stores), then read them from a new process; every op is
    interleaved across the backends, entry by entry."""
    roots = {backend: tmp / f"{backend}-{size.split(',')[0]}" for backend in BACKENDS}
    stores = {backend: DiskStore(root, backend) for backend, root in roots.items()}
    keys = [block_key("bench", None, rng.integers(0, 2**31, 16)) for _ in range(entries)]
    data = [(rng.standard_normal(shape).astype(ml_dtypes.bfloat16),
             rng.standard_normal(shape).astype(ml_dtypes.bfloat16)) for _ in keys]
    want = {key: _digest(k, v) for key, (k, v) in zip(keys, data, strict=True)}
    puts: dict[str, list[float]] = {b: [] for b in BACKENDS}
    contains: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i, (key, (k, v)) in enumerate(zip(keys, data, strict=True)):
        for backend in _turn(list(BACKENDS), i):
            t0 = time.perf_counter()
            assert stores[backend].put(key, k, v)
            puts[backend].append(time.perf_counter() - t0)
    order = [keys[i] for i in rng.permutation(entries)]
    for i, key in enumerate(order):
        for backend in _turn(list(BACKENDS), i):
            t0 = time.perf_counter()
            assert stores[backend].contains(key)
            contains[backend].append(time.perf_counter() - t0)
    str_roots = {backend: str(root) for backend, root in roots.items()}
    gets = read_all(str_roots, order)
    res = subprocess.run([sys.executable, __file__, "--restart-read", json.dumps(str_roots),
                          *order], capture_output=True, text=True, check=True, timeout=600)
    restart = json.loads(res.stdout)
    nbytes = 2 * data[0][0].nbytes
    rows = []
    for backend in BACKENDS:
        for name, (_, digests) in (("get", gets[backend]), ("restart", restart[backend])):
            assert digests == [want[key] for key in order], f"{backend} {name}: data differs"
        g, r, p = gets[backend][0], restart[backend][0], puts[backend]
        rows.append(Row(backend, size, nbytes / 1024, entries,
                        _p(p, 50), _p(p, 99), _mb_s(nbytes, p),
                        _p(g, 50), _p(g, 99), _mb_s(nbytes, g), _p(contains[backend], 50),
                        _p(r, 50), _p(r, 99), _mb_s(nbytes, r)))
    return rows


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    head = ("| entry | backend | put p50 / p99 (µs) | put MB/s | get p50 / p99 (µs) | get MB/s "
            "| contains p50 (µs) | restart get p50 / p99 (µs) | restart MB/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.size} | {r.backend} | {r.put_p50_us:.0f} / {r.put_p99_us:.0f} "
            f"| {r.put_mb_s:.0f} | {r.get_p50_us:.0f} / {r.get_p99_us:.0f} | {r.get_mb_s:.0f} "
            f"| {r.contains_p50_us:.1f} | {r.restart_get_p50_us:.0f} / "
            f"{r.restart_get_p99_us:.0f} | {r.restart_get_mb_s:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=200, help="entries per (backend, size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--restart-read", nargs="+", metavar="ARG",
                    help="internal: JSON {backend: root}, then keys: time reads here")
    args = ap.parse_args(argv)
    if args.restart_read:
        roots, *keys = args.restart_read
        print(json.dumps(read_all(json.loads(roots), keys)))
        return 0
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvjax-l3-bench-") as tmp:
        for size, shape in SIZES:
            rows += measure(size, shape, args.entries, Path(tmp), rng)
            print(f"{size} done", file=sys.stderr)
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    summary = {b: statistics.median(r.put_p50_us + r.get_p50_us for r in rows if r.backend == b)
               for b in BACKENDS}
    print(f"\nmedian over sizes of put p50 + get p50 (µs): {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
