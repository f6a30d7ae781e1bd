"""The prefix-sharing experiment, run small through the runner: hit counts recomputed
here from the workload's shape, and outputs identical with and without the cache."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

import experiments.prefix_sharing.experiment as experiment
from kvjax import runner


def test_system_prompt_hits_are_the_shared_full_blocks(tmp_path: Path) -> None:
    system_len, question_len, block, n = 48, 8, 16, 3
    cfg = {"experiment": "prefix-sharing",
           "params": {"model": "qwen2.5-0.5b", "num_layers": 1, "vocab_size": 512,
                      "dtype": "float32", "block_size": block, "pool_blocks": [64],
                      "workloads": ["system-prompt"], "max_new_tokens": 2, "repeats": 1,
                      "num_requests": n, "system_len": system_len,
                      "question_len": question_len}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    runner.run(runner.load(path, out))
    with (out / "prefix_sharing.csv").open() as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    prompt = system_len + question_len
    # Every request after the first reuses the system prompt's full blocks.
    shared = system_len // block * block
    cache, plain = rows["cache"], rows["no-cache"]
    assert int(cache["prompt_tokens"]) == int(plain["prompt_tokens"]) == n * prompt
    assert int(cache["hit_tokens"]) == (n - 1) * shared
    assert int(plain["hit_tokens"]) == 0
    for r in (cache, plain):
        assert int(r["prefill_tokens_saved"]) + int(r["prefill_tokens_computed"]) == n * prompt
        assert r["tokens_identical"] == "True"
    assert (out / "prefix_sharing.png").stat().st_size > 10_000


def test_a_sweep_split_by_pool_resumes_from_finished_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, int, str]] = []
    real = experiment._setting

    def counting(p: experiment.Params, model: Any, params: Any, workload: str, pool: int,
                 mode: str, *args: Any) -> dict[str, Any]:
        ran.append((workload, pool, mode))
        return real(p, model, params, workload, pool, mode, *args)

    monkeypatch.setattr(experiment, "_setting", counting)
    base = {"model": "qwen2.5-0.5b", "num_layers": 1, "vocab_size": 256, "dtype": "float32",
            "block_size": 16, "workloads": ["multi-turn"], "max_new_tokens": 2,
            "repeats": 1, "system_len": 40, "num_conversations": 2, "num_turns": 2,
            "user_len": 8}

    def run(**params: Any) -> list[dict[str, str]]:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({"experiment": "prefix-sharing",
                                        "params": {**base, **params}}))
        runner.run(runner.load(path, tmp_path / "out"))
        with (tmp_path / "out" / "prefix_sharing.csv").open() as f:
            return list(csv.DictReader(f))

    run(pool_blocks=[12])
    assert ran == [("multi-turn", 12, "cache"), ("multi-turn", 12, "no-cache")]
    both = run(pool_blocks=[12, 24])  # only the new pool is run
    assert ran[2:] == [("multi-turn", 24, "cache"), ("multi-turn", 24, "no-cache")]
    assert [(r["pool_blocks"], r["mode"]) for r in both] == [
        ("12", "cache"), ("12", "no-cache"), ("24", "cache"), ("24", "no-cache")]
    assert all(r["tokens_identical"] == "True" and r["device"] for r in both)
    with (tmp_path / "out" / "requests.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4 * 2 * 2  # settings x chats x turns
    assert run(pool_blocks=[12, 24]) == both and len(ran) == 4  # all reused
    run(pool_blocks=[12], max_new_tokens=3)  # another parameter: recomputed
    assert ran[4:] == [("multi-turn", 12, "cache"), ("multi-turn", 12, "no-cache")]


def test_bad_parameters_raise_before_any_work() -> None:
    with pytest.raises(ValueError, match="attention must be 'auto' or one of"):
        experiment.Params(attention="cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        experiment.Params(dtype="float16")
    with pytest.raises(ValueError, match="unknown workloads"):
        experiment.Params(workloads=("chat",))
    with pytest.raises(ValueError, match="cannot hold the largest request"):
        experiment.Params(pool_blocks=(4,))
    assert experiment.Params(attention="auto").attention == "auto"
