"""The experiment runner: validation before work, the files a run writes."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from experiments.paged_vs_dense.experiment import Params, workload
from kvjax import runner
from kvjax.analysis.presets import get_preset
from kvjax.analysis.sizing import kv_bytes_per_token


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("cfg", "match"), [
    ({"experiment": "no-such-thing"}, "unknown experiment 'no-such-thing'"),
    ({"experiment": "paged-vs-dense", "parms": {}}, r"unknown config keys \['parms'\]"),
    ({"experiment": "paged-vs-dense", "params": {"num_reqs": 3}}, r"\['num_reqs'\]"),
    ({"experiment": "paged-vs-dense", "params": {"num_requests": "many"}}, "num_requests"),
    ({"experiment": "paged-vs-dense", "params": {"block_sizes": 8}}, "block_sizes"),
    ({"params": {}}, "no 'experiment'"),
])
def test_bad_configs_fail_before_work(tmp_path: Path, cfg: dict, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(runner.ExperimentConfigError, match=match):
        runner.load(_write(tmp_path, cfg), out)
    assert not out.exists()


def test_paged_vs_dense_run_writes_consistent_results(tmp_path: Path) -> None:
    cfg = runner.load(_write(tmp_path, {"experiment": "paged-vs-dense", "params": {
        "num_requests": 60, "max_context": 1024, "block_sizes": [1, 16, 64],
        "budget_tokens": 8192, "seed": 3}}), tmp_path / "out")
    record = runner.run(cfg)
    out = tmp_path / "out"
    for name in ("results.json", "config.yaml", "layouts.csv", "paged_vs_dense.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["params"]["block_sizes"] == [1, 16, 64]
    assert saved["environment"]["backend"] == "cpu"
    rows = {r["layout"]: r for r in record["results"]["layouts"]}
    # Independent recomputation from the workload.
    prompt, output = workload(Params(num_requests=60, max_context=1024, seed=3))
    total = prompt + output
    assert rows["dense"]["held_tokens"] == total.sum()
    assert rows["dense"]["reserved_tokens"] == 60 * 1024
    assert rows["dense"]["requests_fit"] == 8
    for bs in (1, 16, 64):
        blocks = sum(-(-int(t) // bs) for t in total)
        row = rows[f"paged-{bs}"]
        assert row["reserved_tokens"] == blocks * bs
        assert row["held_tokens"] == total.sum()
        fit, used = 0, 0
        for t in total:
            used += -(-int(t) // bs)
            if used > 8192 // bs:
                break
            fit += 1
        assert row["requests_fit"] == fit
    assert rows["paged-1"]["waste_pct"] == 0.0
    assert rows["paged-16"]["waste_pct"] < rows["paged-64"]["waste_pct"] < rows["dense"]["waste_pct"]
    bpt = kv_bytes_per_token(get_preset("llama-3-8b"), "bf16")
    assert record["results"]["kv_bytes_per_token"] == bpt == 131072
    with (out / "layouts.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_overrides_replace_params_and_are_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, {"experiment": "kv-cost",
                             "params": {"batch": 2, "contexts": [64, 128]}})
    over = runner.parse_overrides(["contexts=[32, 48, 64]", "dtype=bfloat16", "caches=[paged]"])
    assert over == {"contexts": [32, 48, 64], "dtype": "bfloat16", "caches": ["paged"]}
    p = runner.load(path, tmp_path / "out", over).params
    assert (p.batch, p.contexts, p.dtype, p.caches) == (2, (32, 48, 64), "bfloat16", ("paged",))
    with pytest.raises(runner.ExperimentConfigError, match="batchsize"):
        runner.load(path, None, runner.parse_overrides(["batchsize=3"]))
    with pytest.raises(runner.ExperimentConfigError, match="multiple of block_size"):
        runner.load(path, None, {"caches": ["paged"], "contexts": [40, 64]})
    for bad in ("steps", "=3", "x=[1,"):
        with pytest.raises(runner.ExperimentConfigError, match="override"):
            runner.parse_overrides([bad])


@pytest.mark.parametrize("name", runner.EXPERIMENTS)
def test_every_experiment_accepts_a_config_with_no_params(tmp_path: Path, name: str) -> None:
    """The defaults are a valid run: a config may name just the experiment."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": name}))
    cfg = runner.load(path, tmp_path / "out")
    assert cfg.experiment == name and dataclasses.is_dataclass(cfg.params)
