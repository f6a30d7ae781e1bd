"""``kvjax serve-bench``: strict config, synthetic workloads, and one end-to-end replay."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kvjax.cli import main
from kvjax.engine.serve_config import ServeBenchConfigError, load_config, parse_config
from kvjax.engine.workload import LengthDist, WorkloadConfig, make_workload
from kvjax.models.fused_decode import FusedLaunch

# Small enough to compile three step shapes: [2, 1], [1, 16] and [2, 16], table width 8.
SMALL: dict[str, Any] = {
    "model": {"preset": "tiny", "dtype": "float32", "seed": 3},
    "engine": {"num_blocks": 64, "block_size": 16, "max_batch": 2, "prefill_chunk": 16,
               "max_tokens_per_step": 32, "prefix_caching": True},
    "workload": {"num_requests": 10, "arrival_rate": 40.0,
                 "prompt_len": {"dist": "uniform", "min": 4, "max": 40},
                 "output_len": {"dist": "fixed", "value": 6},
                 "shared_prefix_fraction": 0.5, "shared_prefix_len": 32, "seed": 1},
    "p99_itl_target_ms": 10000.0,
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """SMALL with ``a.b.c`` set to ``value`` (a deep copy)."""
    raw = json.loads(json.dumps(SMALL))
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_configs_parse() -> None:
    cpu = load_config(CONFIGS / "serve-bench.yaml")
    gpu = load_config(CONFIGS / "serve-bench-gpu.yaml")
    assert cpu.model.preset == "tiny" and cpu.engine.prefix_caching
    assert gpu.model.preset == "qwen2.5-0.5b" and gpu.model.dtype == "bfloat16"
    assert gpu.model.model_config().num_layers == 24


@pytest.mark.parametrize(("path", "value", "match"), [
    ("engine.max_batchh", 4, "unknown key engine.max_batchh"),
    ("surprise", 1, "unknown key surprise"),
    ("workload.prompt_len.value", 4, r"unknown key workload.prompt_len.value"),
    ("workload.output_len", {"dist": "zipf"}, "workload.output_len.dist must be one of"),
    ("model.extra", 1, "unknown key model.extra"),
    ("engine.max_batch", "8", "engine.max_batch must be an integer"),
    ("engine.prefix_caching", 1, "engine.prefix_caching must be true or false"),
    ("engine.max_tokens_per_step", 1, "max_tokens_per_step must be >= max_batch"),
    ("engine.decode_steps", 0, "decode_steps must be >= 1"),
    ("engine.overlap_bursts", "yes", "overlap_bursts must be true or false"),
    ("engine.preemption", "drop", "preemption must be one of"),
    ("engine.swap_blocks", 8, "swap_blocks must be >= 1 with preemption 'swap'"),
    ("engine.host_staging", "fast", "host_staging must be one of"),
    ("workload.arrival_rate", -1.0, "arrival_rate must be >= 0"),
    ("model.preset", "gpt-9", "unknown preset"),
    ("model.max_context", 64, "exceeds the model's context of 64"),
    ("engine.num_blocks", 3, "the pool has 3"),
    ("workload.shared_prefix_len", 0, "needs shared_prefix_len > 0"),
    ("engine.fused_launch", {"mlp": "xla"}, "unknown key engine.fused_launch.mlp"),
    ("engine.fused_launch", {"down": {"split": 2}}, "unknown settings"),
    ("engine.fused_launch", {"qkv": "cublas"}, "expected 'xla'"),
    ("engine.fused_launch", {"gate_up": {"block_n": 0}}, "block_n must be an int >= 1"),
    ("engine.fused_launch", {"qkv": "xla"}, "fused_launch is only used with fused_decode"),
])
def test_bad_config_names_the_problem(path: str, value: Any, match: str) -> None:
    with pytest.raises(ServeBenchConfigError, match=match):
        parse_config(_with(path, value))


def test_fused_launch_in_a_config() -> None:
    """engine.fused_launch: a piece left to XLA and another's settings, the rest kept."""
    raw = _with("engine.fused_launch", {"qkv": "xla", "down": {"split_k": 4}})
    raw["engine"]["fused_decode"] = True
    cfg = parse_config(raw)
    launch = cfg.engine.fused_launch
    assert launch.settings("qkv") is None and launch.settings("down") == {"split_k": 4}
    assert launch.settings("o_proj") == FusedLaunch().settings("o_proj")
    assert parse_config(_with("engine.decode_steps", 2)).engine.fused_launch == FusedLaunch()


def test_cli_rejects_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    cfg = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump(_with("workload.num_requestz", 3)))
    code = main(["serve-bench", "--config", str(cfg), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key workload.num_requestz" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_workload_distributions() -> None:
    cfg = WorkloadConfig(num_requests=4000, arrival_rate=50.0,
                         prompt_len=LengthDist("lognormal", median=100.0, sigma=0.5, min=20,
                                               max=300),
                         output_len=LengthDist("uniform", min=3, max=9),
                         shared_prefix_fraction=0.25, shared_prefix_len=7, seed=5)
    items = make_workload(cfg, vocab_size=1000)
    assert items == make_workload(cfg, vocab_size=1000)  # reproducible
    arrivals = np.asarray([it.arrival_s for it in items])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 50) < 0.1 / 50  # exponential gaps of mean 1 / rate
    assert abs(np.std(gaps) / gaps.mean() - 1) < 0.1  # coefficient of variation 1
    outs = np.asarray([it.max_new_tokens for it in items])
    assert set(outs.tolist()) == set(range(3, 10))
    shared = [it for it in items if it.shared_prefix]
    assert abs(len(shared) / len(items) - 0.25) < 0.03
    assert len({it.prompt[:7] for it in shared}) == 1
    own = np.asarray([len(it.prompt) - 7 * it.shared_prefix for it in items])
    assert own.min() >= 20 and own.max() <= 300
    assert abs(np.median(own) - 100) < 5
    assert all(0 <= t < 1000 for it in items[:50] for t in it.prompt)
    offline = make_workload(WorkloadConfig(num_requests=5, arrival_rate=0.0), 1000)
    assert [it.arrival_s for it in offline] == [0.0] * 5


def test_serve_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    code = main(["serve-bench", "--config", str(cfg_path), "--output-dir", str(out),
                 "--no-progress"])
    table = capsys.readouterr().out
    assert code == 0
    for label in ("output throughput", "TTFT p99", "ITL p99", "batch occupancy",
                  "preemptions", "prefix hit rate", "p99 ITL target"):
        assert label in table
    record = json.loads((out / "results.json").read_text())
    s = record["summary"]
    items = make_workload(load_config(cfg_path).workload, vocab_size=512)
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    with (out / "steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    # Every request ran to its own length (no stop ids), in workload order.
    assert [int(r["output_tokens"]) for r in rows] == [it.max_new_tokens for it in items]
    assert [int(r["prompt_tokens"]) for r in rows] == [len(it.prompt) for it in items]
    assert s["output_tokens"] == 6 * len(items) == sum(int(x["new_tokens"]) for x in steps)
    assert s["requests"] == len(items) and s["finish_reasons"] == {"length": len(items)}
    assert s["duration_s"] >= items[-1].arrival_s  # replayed in wall-clock time
    assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] and 0 < s["itl_p50_ms"] <= s["itl_p99_ms"]
    assert 0 < s["batch_occupancy"] <= 1 and s["steps"] == len(steps)
    # The budget of 32 tokens and the batch of 2 hold in every step.
    assert max(int(x["prefill_tokens"]) + int(x["decode_tokens"]) for x in steps) <= 32
    assert max(int(x["rows"]) for x in steps) == 2
    # Later shared-prefix requests hit the cached prefix (two full blocks of 16).
    hits = [int(r["cached_tokens"]) for r, it in zip(rows, items, strict=True)
            if it.shared_prefix]
    assert s["prefix_hit_tokens"] > 0 and max(hits) >= 32
    assert record["precompile"]["shapes"] == 3 and s["compiled_during_run"] == 0
    assert s["meets_p99_itl_target"] is True


@pytest.mark.slow
def test_engine_vs_hf_tiny(tmp_path: Path) -> None:
    """The GPU benchmark script end to end on its tiny CPU setting (about a minute)."""
    import subprocess
    import sys

    script = CONFIGS.parent / "benchmarks" / "engine_vs_hf.py"
    out = tmp_path / "evh.json"
    subprocess.run([sys.executable, str(script), "--tiny", "--repeats", "2", "--out", str(out),
                    "--jax-cache", ""], check=True, timeout=300)
    record = json.loads(out.read_text())
    assert len(record["offline"]) == 4 and record["online"]["rows"]
    for row in record["offline"]:
        assert row["engine"]["decode_tok_s"] > 0 and row["hf_static"]["decode_tok_s"] > 0
        runs = row["engine"]["decode_tok_s_runs"]
        assert len(runs) == 2 and row["engine"]["decode_tok_s"] == max(runs)
        # the burst alone, timed in the same process, and the engine's rate against it
        assert row["bare_burst_ms"] and all(v > 0 for v in row["bare_burst_ms"].values())
        assert row["engine"]["engine_vs_bare"] > 0
        # Same weights: greedy first tokens agree with transformers.
        assert row["agreement_vs_hf_dynamic"]["first_token"] >= 0.75


def test_serve_bench_with_decode_bursts(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """engine.decode_steps reaches the engine: burst steps appear, every request still
    gets its own length, and precompiling covers the burst programs."""
    cfg_path = tmp_path / "bursts.yaml"
    cfg_path.write_text(yaml.safe_dump(_with("engine.decode_steps", 3)))
    out = tmp_path / "out"
    assert main(["serve-bench", "--config", str(cfg_path), "--output-dir", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    s = json.loads((out / "results.json").read_text())["summary"]
    items = make_workload(load_config(cfg_path).workload, vocab_size=512)
    with (out / "steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    assert s["output_tokens"] == 6 * len(items) and s["compiled_during_run"] == 0
    assert any(int(x["decode_steps"]) == 3 for x in steps)


def test_serve_bench_swap_preemption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """engine.preemption: swap (set from the command line) with a pool too small for the
    batch: requests are swapped out and back, every request still gets its full length,
    and the summary counts it."""
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    sets = ["engine.num_blocks=8", "engine.preemption=swap", "engine.swap_blocks=16",
            "engine.prefix_caching=false", "workload.output_len.value=40"]
    assert main(["serve-bench", "--config", str(cfg_path), "--output-dir", str(out),
                 "--no-progress", *[a for x in sets for a in ("--set", x)]]) == 0
    capsys.readouterr()
    s = json.loads((out / "results.json").read_text())["summary"]
    assert s["requests"] == 10 and s["output_tokens"] == 40 * 10  # decodes grow: preempt
    assert s["preemptions"] > 0 and s["swapped_out_blocks"] > 0
    assert 0 < s["swapped_in_blocks"] <= s["swapped_out_blocks"]
    assert s["swap_gbps_to_host"] > 0 and s["swap_gbps_to_device"] > 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["engine"]["preemption"] == "swap"


@pytest.mark.parametrize(("override", "message"), [
    ("engine.preemption=bogus", "preemption must be one of"),
    ("engine.num_blocks.x=3", "num_blocks is not a mapping"),
    ("engine", "is not KEY=VALUE"),
    ("engine.surprise=1", "unknown key engine.surprise"),
])
def test_serve_bench_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  override: str, message: str) -> None:
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    assert main(["serve-bench", "--config", str(cfg_path), "--set", override]) == 2
    assert message in capsys.readouterr().err
