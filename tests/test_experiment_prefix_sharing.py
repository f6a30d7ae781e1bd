"""The prefix-sharing experiment, run small through the runner: hit counts recomputed
here from the workload's shape, and outputs identical with and without the cache."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

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
