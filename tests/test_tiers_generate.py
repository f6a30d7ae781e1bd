"""Generation over a tiered prefix cache: a small device pool (L1) over host slots (L2)
and a disk store (L3), compared with the same generator over an unbounded pool.

One workload runs through every tier setup: shared "documents" cycled through calls of
three requests, then a multi-turn follow-up of each; the pool holds about one request,
so every call demotes blocks and promotes them back. Prompts are built from the
reference's outputs, so every run sees the same inputs; outputs must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvjax.cli import main
from kvjax.engine.prefix_generate import PrefixCachedGenerator, PrefixGenerationStats
from kvjax.memory.blob_store import BACKENDS
from kvjax.memory.disk_store import DEFAULT_BACKEND
from kvjax.memory.hicache import L2, L3
from kvjax.memory.host_pool import demote
from kvjax.memory.tiered_requests import TierConfig, TieredRequests
from kvjax.models import LoadedModel

BS = 4
NEW = 10
POOL = 12  # blocks: one 8-block request plus a shared document's 4
DEVICE = 128  # device pages of every generator here: one set of compiled steps


def _calls(vocab: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Three calls over four 16-token documents, and the follow-up turns' new tokens."""
    rng = np.random.default_rng(11)
    docs = [rng.integers(3, vocab, 16).tolist() for _ in range(4)]
    order = [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
    calls = [[docs[d] + rng.integers(3, vocab, 5).tolist() for d in call] for call in order]
    return calls, [rng.integers(3, vocab, 3).tolist() for _ in range(3)]


def _drive(gen: PrefixCachedGenerator, calls: list[list[list[int]]], turns: list[list[int]],
           outputs: list[list[list[int]]] | None = None,
           after_call: Callable[[], None] | None = None,
           ) -> tuple[list[list[list[int]]], list[PrefixGenerationStats]]:
    """The calls, then call 0's prompts + outputs + a new turn; ``outputs`` (the
    reference's) fix the follow-up prompts.  Returns per-call outputs and stats."""
    outs, stats = [], []
    for i in range(len(calls) + 1):
        if i < len(calls):
            prompts = calls[i]
        else:
            first = (outputs or outs)[0]
            prompts = [p + o + t for p, o, t in zip(calls[0], first, turns, strict=True)]
        out, st = gen.generate(prompts, max_new_tokens=NEW)
        gen.cache.check_invariants()
        assert gen.cache.requests() == []
        if after_call is not None:
            after_call()
        outs.append(out.tokens)
        stats.append(st)
    return outs, stats


def _l1_blocks(gen: PrefixCachedGenerator) -> dict[str, tuple[bytes, bytes]]:
    """``key -> (k bytes, v bytes)`` of every device page the tiered tree owns."""
    assert isinstance(gen.cache, TieredRequests)
    pages = gen.cache.tiers.l1_pages
    k, v = demote(gen.cache.tiers.cache, list(pages))
    return {key: (k[i].tobytes(), v[i].tobytes()) for i, key in enumerate(pages.values())}


@pytest.fixture(scope="module")
def reference(llama: LoadedModel) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Outputs and per-request hit tokens over an unbounded pool (L1 only)."""
    calls, turns = _calls(llama.config.vocab_size)
    gen = PrefixCachedGenerator(llama.model, llama.params, num_blocks=DEVICE, block_size=BS)
    outs, stats = _drive(gen, calls, turns)
    assert gen.stats().evicted_blocks == 0
    return outs, [[r.hit_tokens for r in st.requests] for st in stats]


def _tiered(lm: LoadedModel, **tiers: Any) -> PrefixCachedGenerator:
    return PrefixCachedGenerator(lm.model, lm.params, num_blocks=POOL, block_size=BS,
                                 device_blocks=DEVICE, tiers=TierConfig(**tiers))


@pytest.mark.parametrize(("setup", "lossless"), [
    ({"host_blocks": 16}, False),  # L2 only: blocks L2 cannot keep are dropped
    ({"host_blocks": 6, "disk": True, "prefetch": "off"}, True),
    ({"host_blocks": 6, "disk": True, "prefetch": "wait_complete",
      "write_policy": "write_through"}, True),
    ({"host_blocks": 6, "host_staging": "pinned", "disk": True, "prefetch": "wait_complete"},
     True),
    ({"host_blocks": 6, "host_staging": "pinned-slots", "disk": True,
      "prefetch": "wait_complete"}, True),
    ({"host_blocks": 0, "disk": True, "prefetch": "wait_complete"}, True),  # L1 + L3
    ({"host_blocks": 6, "disk": True, "prefetch": "best_effort"}, False),
    ({"host_blocks": 6, "disk": True, "prefetch": "timeout", "prefetch_timeout_s": 0.5},
     False),
], ids=["l2", "l3-off", "l3-wait-through", "l3-wait-pinned", "l3-wait-pinned-slots",
        "l3-only-wait",
        "l3-best-effort", "l3-timeout"])
def test_tiers_are_token_identical_to_an_unbounded_pool(
        llama: LoadedModel, tmp_path: Path, reference: tuple[list[Any], list[Any]],
        setup: dict[str, Any], lossless: bool) -> None:
    ref_out, ref_hits = reference
    calls, turns = _calls(llama.config.vocab_size)
    disk = setup.pop("disk", False)
    gen = _tiered(llama, disk_dir=str(tmp_path / "l3") if disk else None, **setup)
    outs, stats = _drive(gen, calls, turns, ref_out)
    assert outs == ref_out
    hits = [[r.hit_tokens for r in st.requests] for st in stats]
    if lossless:  # every block the unbounded pool kept is found in some tier
        assert hits == ref_hits
    assert all(h <= r for hs, rs in zip(hits, ref_hits, strict=True)
               for h, r in zip(hs, rs, strict=True))
    t = gen.tier_stats()
    rows = [r for st in stats for r in st.requests]
    assert t["blocks"]["evicted_from_l1"] > 0 and sum(st.groups for st in stats) > len(stats)
    assert t["hit_tokens"][L2] == sum(r.l2_hit_tokens for r in rows)
    assert t["hit_tokens"][L3] == sum(r.l3_hit_tokens for r in rows)
    assert sum(t["hit_tokens"].values()) == sum(r.hit_tokens for r in rows)
    assert t["hit_tokens"][L2] == BS * t["blocks"]["l2_to_l1"]
    assert t["hit_tokens"][L3] == BS * t["blocks"]["l3_to_l1"]
    assert t["hit_tokens"][L2] + t["hit_tokens"][L3] > 0  # the lower tiers served hits
    assert t["hit_tokens"][L2] > 0 or setup["host_blocks"] == 0 or disk
    assert t["hit_tokens"][L2] == 0 or setup["host_blocks"] > 0
    if lossless:  # blocks came back from disk, through a prefetch or at lookup
        assert t["bytes"]["from_disk"] > 0 and t["gbps"]["disk_read"] > 0
    slot = gen.cache.tiers.host.slot_bytes if isinstance(gen.cache, TieredRequests) else 0
    moved = t["blocks"]["l2_to_l1"] + t["blocks"]["l3_to_l1"]
    assert t["bytes"]["host_to_device"] == moved * slot
    if setup.get("write_policy") != "write_through":  # write-back copies on eviction only
        assert t["bytes"]["device_to_host"] == t["blocks"]["evicted_from_l1"] * slot
    for direction in ("device_to_host", "host_to_device"):
        assert t["gbps"][direction] > 0 and t["seconds"][direction] > 0
    if disk:
        assert t["bytes"]["to_disk"] > 0 and t["gbps"]["disk_write"] > 0
        assert t["l3"] == {"configured": True, "backend": DEFAULT_BACKEND, "enabled": True,
                           "disabled_reason": None, "read_misses": {}}
    if setup.get("prefetch", "off") != "off" and disk and setup["host_blocks"]:
        assert t["prefetches"] > 0 and t["seconds"]["prefetch_hidden"] >= 0
        assert t["seconds"]["prefetch_wait"] == pytest.approx(
            sum(r.prefetch_wait_s for r in rows))


def test_promoted_blocks_are_bit_exact(llama: LoadedModel, tmp_path: Path,
                                       reference: tuple[list[Any], list[Any]]) -> None:
    """With a disk nothing is recomputed: whenever a block is back in L1 (through L2 or
    L3), its device page holds exactly the bytes computed when it was first cached."""
    ref_out, _ = reference
    calls, turns = _calls(llama.config.vocab_size)
    gen = _tiered(llama, host_blocks=12, disk_dir=str(tmp_path / "l3"), prefetch="off")
    first: dict[str, tuple[bytes, bytes]] = {}
    compared = []

    def check() -> None:
        for key, data in _l1_blocks(gen).items():
            compared.append(key in first)
            assert first.setdefault(key, data) == data

    _drive(gen, calls, turns, ref_out, check)
    t = gen.tier_stats()
    assert t["blocks"]["l2_to_l1"] > 0 and t["blocks"]["l3_to_l1"] > 0 and any(compared)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_reuses_l3_blocks_of_an_earlier_generator(
        llama: LoadedModel, tmp_path: Path, reference: tuple[list[Any], list[Any]],
        backend: str) -> None:
    ref_out, _ = reference
    calls, _ = _calls(llama.config.vocab_size)
    l3 = str(tmp_path / "l3")
    # no L2: evictions go straight to disk
    first = _tiered(llama, host_blocks=0, disk_dir=l3, disk_backend=backend)
    for call, want in zip(calls, ref_out, strict=False):
        assert first.generate(call, max_new_tokens=NEW)[0].tokens == want
    first.evict()  # everything down to disk
    written = first.tier_stats()["bytes"]["to_disk"]
    assert written > 0
    del first

    second = _tiered(llama, host_blocks=4, disk_dir=l3, disk_backend=backend, prefetch="off")
    out, st = second.generate(calls[0], max_new_tokens=NEW)
    assert out.tokens == ref_out[0]
    assert second.tier_stats()["l3"]["backend"] == backend
    # Each prompt's document and question blocks were written by the first generator
    # (a fully cached prompt recomputes its last block for the logits).
    assert [r.l3_hit_tokens for r in st.requests] == [20, 20, 20]
    assert second.tier_stats()["bytes"]["to_disk"] == 0  # nothing new was evicted
    other = _tiered(llama, host_blocks=4, disk_dir=l3, disk_backend=backend,
                    namespace="other-weights")
    assert other.generate(calls[0], max_new_tokens=NEW)[1].hit_tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["truncate", "flip", "delete"])
def test_damaged_l3_entries_are_misses_never_wrong_output(
        llama: LoadedModel, tmp_path: Path, reference: tuple[list[Any], list[Any]],
        fault: str, backend: str) -> None:
    ref_out, _ = reference
    calls, _ = _calls(llama.config.vocab_size)
    l3 = str(tmp_path / "l3")
    first = _tiered(llama, host_blocks=0, disk_dir=l3, disk_backend=backend)
    first.generate(calls[0], max_new_tokens=NEW)
    first.evict()
    assert isinstance(first.cache, TieredRequests) and first.cache.tiers.disk is not None
    disk = first.cache.tiers.disk
    for prompt in calls[0]:  # damage the second block of every prompt of the call
        path = disk.path(first.cache.tiers.keys(prompt)[1])
        data = path.read_bytes()
        if fault == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif fault == "flip":
            buf = bytearray(data)
            buf[-7] ^= 0x10
            path.write_bytes(bytes(buf))
        else:
            path.unlink()
    second = _tiered(llama, host_blocks=4, disk_dir=l3, disk_backend=backend, prefetch="off")
    out, st = second.generate(calls[0], max_new_tokens=NEW)
    assert out.tokens == ref_out[0]
    # the first block of each prompt is still used; from the damaged one on, recomputed
    assert [r.hit_tokens for r in st.requests] == [BS, BS, BS]
    misses = second.tier_stats()["l3"]["read_misses"]
    want = {"truncate": {"truncated": 3}, "flip": {"checksum": 3}, "delete": {}}[fault]
    assert misses == want
    second.cache.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failure", ["blocked-dir", "disk-full"])
def test_unwritable_l3_warns_and_generation_goes_on(
        llama: LoadedModel, tmp_path: Path, reference: tuple[list[Any], list[Any]],
        disk_full: Callable[[str], None], failure: str, backend: str) -> None:
    ref_out, _ = reference
    calls, turns = _calls(llama.config.vocab_size)
    if failure == "blocked-dir":  # a regular file where the directory should be (root too)
        (tmp_path / "file").write_bytes(b"x")
        with pytest.warns(RuntimeWarning, match="DiskStore disabled"):
            gen = _tiered(llama, host_blocks=2, disk_dir=str(tmp_path / "file" / "l3"),
                          disk_backend=backend)
        outs, _ = _drive(gen, calls, turns, ref_out)
    else:
        gen = _tiered(llama, host_blocks=2, disk_dir=str(tmp_path / "l3"), disk_backend=backend)
        disk_full(backend)
        with pytest.warns(RuntimeWarning, match="No space left"):
            outs, _ = _drive(gen, calls, turns, ref_out)
    assert outs == ref_out
    t = gen.tier_stats()
    assert t["l3"]["configured"] and not t["l3"]["enabled"] and t["l3"]["backend"] == backend
    assert "No space left" in t["l3"]["disabled_reason"] or failure == "blocked-dir"
    assert t["blocks"]["dropped"] > 0 and t["bytes"]["to_disk"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, then quietly without L3
        assert gen.generate(calls[0], max_new_tokens=NEW)[0].tokens == ref_out[0]


def test_cli_tiers_reuse_l3_across_runs(capsys: pytest.CaptureFixture[str], llama_dir: Path,
                                        llama: LoadedModel, tmp_path: Path) -> None:
    assert main(["generate", "--model", str(llama_dir), "--token-ids", "5,6,7",
                 "--l3-dir", str(tmp_path)]) == 2
    assert "--prefix-cache" in capsys.readouterr().err
    rng = np.random.default_rng(5)
    doc = rng.integers(3, llama.config.vocab_size, 16).tolist()
    prompts = [[*doc, 7, 8], rng.integers(3, llama.config.vocab_size, 18).tolist(), [*doc, 9]]
    argv = ["generate", "--model", str(llama_dir), "--token-ids",
            *(",".join(map(str, p)) for p in prompts), "--cache", "paged", "--prefix-cache",
            "--block-size", str(BS), "--num-blocks", "8", "--max-new-tokens", "6",
            "--stop-ids", "", "--l2-blocks", "2", "--l3-dir", str(tmp_path / "l3"), "--json"]
    ref = PrefixCachedGenerator(llama.model, llama.params, num_blocks=DEVICE, block_size=BS)
    want = [ref.generate([p], max_new_tokens=6)[0].tokens[0] for p in prompts]
    runs = []
    for backend in BACKENDS:  # the second run starts empty but for the directory
        assert main([*argv, "--l3-backend", backend]) == 0
        record = json.loads(capsys.readouterr().out)
        assert [r["token_ids"] for r in record["results"]] == want
        runs.append((record["prefix_cache"], [r["prefix"] for r in record["results"]]))
    (first, first_rows), (second, second_rows) = runs
    assert first["tiers"]["blocks"]["to_l3"] > 0 and first["tiers"]["hit_tokens"]["L2"] > 0
    assert first["tiers"]["blocks"]["persisted_to_l3"] > 0  # what L1 and L2 held at exit
    assert [r["hit_tokens"] for r in first_rows] == [0, 0, 16]
    assert [r["hit_tokens"] for r in second_rows] == [16, 16, 16]  # from the disk
    assert second["tiers"]["hit_tokens"]["L1"] < 48
    assert [first["tiers"]["l3"]["backend"], second["tiers"]["l3"]["backend"]] == list(BACKENDS)


@pytest.mark.slow  # a second Python process imports JAX and compiles: ~20 s
def test_second_process_reuses_l3_written_by_the_first(
        capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    prompt = ",".join(map(str, rng.integers(3, 100, 21).tolist()))
    argv = ["generate", "--model", str(llama_dir), "--token-ids", prompt, "--cache", "paged",
            "--prefix-cache", "--block-size", str(BS), "--max-new-tokens", "5",
            "--stop-ids", "", "--l2-blocks", "2", "--l3-dir", str(tmp_path / "l3"), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    res = subprocess.run([sys.executable, "-m", "kvjax.cli", *argv], capture_output=True,
                         text=True, timeout=300, check=True)
    second = json.loads(res.stdout)
    assert second["results"][0]["token_ids"] == first["results"][0]["token_ids"]
    assert first["prefix_cache"]["hit_tokens"] == 0
    assert second["prefix_cache"]["tiers"]["hit_tokens"]["L3"] + second["prefix_cache"][
        "tiers"]["hit_tokens"]["L2"] == 20  # the prompt's 5 full blocks, from disk
