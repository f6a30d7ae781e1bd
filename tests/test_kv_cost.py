"""The kv-cost experiment, run small through the runner: measured cache bytes equal the
sizing formula recomputed here, for the dense and the paged layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kvjax import runner

# Qwen2.5-0.5B's attention: 2 KV heads of width 64 (model card), 1 layer here.
KV_ELEMENTS_PER_TOKEN = 2 * 1 * 2 * 64


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_kv_cost_memory_matches_formula_for_both_layouts(tmp_path: Path, dtype: str,
                                                         itemsize: int) -> None:
    # bf16: the decode loop carries float32 logits from a bf16 model (a GPU run once
    # failed on exactly that).
    cfg = {"experiment": "kv-cost",
           "params": {"model": "qwen2.5-0.5b", "num_layers": 1, "batch": 3, "dtype": dtype,
                      "contexts": [32, 64, 96], "repeats": 2, "fit_min_context": 64,
                      "bandwidth_mib": 8, "caches": ["dense", "paged"], "block_size": 16}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    runner.run(runner.load(path, out))
    res = json.loads((out / "results.json").read_text())["results"]
    with (out / "kv_cost.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["cache"], int(r["context"])) for r in rows] == [
        (c, t) for c in ("dense", "paged") for t in (32, 64, 96)]
    for r in rows:
        assert int(r["kv_bytes_measured"]) == 3 * int(r["context"]) * KV_ELEMENTS_PER_TOKEN * itemsize
        assert float(r["step_seconds"]) > 0
    assert res["memory_matches_theory"] is True
    assert set(res["fits"]) == {"dense", "paged"}
    assert all(f["contexts_fitted"] == [64, 96] for f in res["fits"].values())
    assert res["attention"]["paged"] == "xla"  # CPU: the XLA gather
    assert (out / "kv_cost.png").stat().st_size > 10_000


@pytest.mark.parametrize(("params", "match"), [
    ({"caches": ["dense", "ring"]}, "caches must be"),
    ({"caches": ["paged"], "contexts": [96, 100]}, "multiple of block_size"),
    ({"contexts": [512, 1024], "fit_min_context": 1024}, "at least two contexts"),
])
def test_kv_cost_bad_params_fail_before_work(tmp_path: Path, params: dict, match: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "kv-cost", "params": params}))
    with pytest.raises(runner.ExperimentConfigError, match=match):
        runner.load(path, tmp_path / "out")
