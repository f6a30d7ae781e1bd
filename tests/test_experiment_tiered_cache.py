"""The tiered-cache experiment: config validation, and a small run through the runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import experiments.tiered_cache.experiment as tiered
from experiments.tiered_cache.experiment import Params, plain_copy_gbps, workload_blocks
from kvjax import runner


def test_params_are_checked_before_any_work() -> None:
    for bad in ({"setups": ("l1-only",)}, {"setups": ("l1-unbounded", "l4")},
                {"prefetch_policy": "off"}, {"l1_blocks": 4}, {"workloads": ()},
                {"host_staging": "locked"}):
        with pytest.raises(ValueError):
            Params(**bad)
    with pytest.raises(ValueError, match="attention must be 'auto' or one of"):
        Params(attention="cuda")  # checked by the workload parameters it builds
    p = Params(num_requests=10, shots=2, shot_len=32, query_len=16, max_new_tokens=8,
               block_size=16)
    assert workload_blocks(p, "few-shot") == 10 * 6  # (64 + 16 + 8) tokens -> 6 blocks
    gbps = plain_copy_gbps(1 << 20, "float32", reps=2)
    # CPU devices have a pinned_host memory, so both copy paths are measured
    assert set(gbps) == {"host_to_device", "device_to_host", "pinned_host_to_device",
                         "pinned_device_to_host"} and min(gbps.values()) > 0


@pytest.mark.slow  # 18 generator runs with their compiles: ~25 s on CPU
def test_small_run_writes_consistent_results(tmp_path: Path) -> None:
    cfg = {"experiment": "tiered-cache", "params": {
        "num_layers": 1, "vocab_size": 512, "dtype": "float32", "block_size": 16,
        "l1_blocks": 12, "l2_blocks": 8, "workloads": ["few-shot"], "repeats": 1,
        "copy_blocks": 4, "max_new_tokens": 4, "requests_per_call": 3, "num_requests": 9,
        "num_tasks": 3, "shots": 2, "shot_len": 48, "query_len": 8}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    record = runner.run(runner.load(path, tmp_path / "out"))
    res = record["results"]
    assert res["all_tokens_identical"]
    rows = {r["setup"]: r for r in res["rows"]}
    assert rows["l1-only"]["hit_rate"] < rows["l1+l2+l3"]["hit_rate"]
    assert rows["l1+l2+l3"]["hit_rate"] == rows["l1-unbounded"]["hit_rate"]  # nothing lost
    assert rows["l3-restart"]["hit_rate"] >= rows["l1+l2+l3+prefetch"]["hit_rate"]
    assert rows["l1+l2+l3+prefetch"]["blocks_prefetched"] > 0
    for r in rows.values():
        assert r["hit_rate"] == pytest.approx(
            r["l1_hit_rate"] + r["l2_hit_rate"] + r["l3_hit_rate"])
    out = tmp_path / "out"
    with (out / "tiered_cache.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "tiered_cache.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["experiment"] == "tiered-cache"


def test_a_resumed_run_compares_new_setups_with_the_saved_reference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    real = tiered._setting

    def counting(runner_: Any, workload: str, setup: str, *args: Any) -> dict[str, Any]:
        ran.append(setup)
        return real(runner_, workload, setup, *args)

    monkeypatch.setattr(tiered, "_setting", counting)
    base = {"num_layers": 1, "vocab_size": 512, "dtype": "float32", "block_size": 16,
            "l1_blocks": 8, "l2_blocks": 8, "workloads": ["few-shot"], "repeats": 1,
            "copy_blocks": 2, "max_new_tokens": 3, "requests_per_call": 2,
            "num_requests": 4, "num_tasks": 2, "shots": 2, "shot_len": 32, "query_len": 8}

    def run(setups: list[str]) -> dict[str, Any]:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({"experiment": "tiered-cache",
                                        "params": {**base, "setups": setups}}))
        return runner.run(runner.load(path, tmp_path / "out"))["results"]

    first = run(["l1-unbounded", "l1-only"])
    second = run(["l1-unbounded", "l1-only", "l1+l2"])
    assert ran == ["l1-unbounded", "l1-only", "l1+l2"]
    assert second["rows"][:2] == first["rows"][:2] and second["all_tokens_identical"]
    saved = tiered.finished_parts(runner.load(tmp_path / "cfg.yaml").params,
                                  tmp_path / "out").load("few-shot-l1-unbounded")
    assert saved is not None and len(saved["outputs"]) == 4
    assert all(len(o) == 3 for o in saved["outputs"])
