"""The attention-sweep experiment end to end at toy size: its table against the sizing
calculator, resuming from finished records (a sweep split over runs, a stale record,
conversions whose MHA model was trained in an earlier run), and fine-tuned conversions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import experiments.attention_sweep.experiment as sweep
from kvjax import runner

TINY: dict[str, Any] = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 4, "head_dim": 8,
    "mha_intermediate_size": 64, "mla_rope_head_dim": 4, "budget_tolerance": 0.1,
    "seq_len": 64, "tasks": ["copy", "grammar"], "steps": 3, "batch_size": 2,
    "warmup_steps": 1, "eval_distances": [4, 16], "eval_per_distance": 2,
    "convert_rope_dim": 4, "decode_batch": 2, "decode_prompt_len": 8,
    "decode_new_tokens": 4, "budget_context": 64, "seed": 3}


def _run(tmp_path: Path, **params: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "attention-sweep",
                                    "params": {**TINY, **params}}))
    record = runner.run(runner.load(path, tmp_path / "out"))
    with (tmp_path / "out" / "attention_sweep.csv").open() as f:
        return record, list(csv.DictReader(f))


def _count_calls(monkeypatch: pytest.MonkeyPatch, function: str = "_train_variant"
                 ) -> list[str]:
    """The names (second argument) ``sweep.<function>`` is called with, in order."""
    names: list[str] = []
    real = getattr(sweep, function)

    def counting(p: sweep.Params, name: str, *args: Any) -> Any:
        names.append(name)
        return real(p, name, *args)

    monkeypatch.setattr(sweep, function, counting)
    return names


def test_sweep_rows_follow_the_sizing_calculator(tmp_path: Path) -> None:
    record, rows = _run(tmp_path, variants=["mha", "gqa-2", "mla-8"], conversions=["mqa"])
    assert [r["model"] for r in rows] == ["mha", "gqa-2", "mla-8", "mha->mqa"]
    bytes_per_token = {r["model"]: int(r["kv_bytes_per_token"]) for r in rows}
    # K and V, bf16, one layer; MLA: the latent plus the shared RoPE key
    assert bytes_per_token == {"mha": 2 * 4 * 8 * 2, "gqa-2": 2 * 2 * 8 * 2,
                               "mla-8": (8 + 4) * 2, "mha->mqa": 2 * 1 * 8 * 2}
    target = record["results"]["target_params"]
    for r in rows[:3]:
        assert abs(int(r["params"]) - target) <= 0.1 * target
    assert rows[0]["device"] and 0 <= float(rows[1]["accuracy"]) <= 1


def test_sweep_resumes_from_finished_records(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _count_calls(monkeypatch)
    first, _ = _run(tmp_path, variants=["mha", "gqa-2"], conversions=["mqa"],
                    save_checkpoints=True)
    assert trained == ["mha", "gqa-2"]
    # a second part of the sweep: only the new variant and the new conversion are computed
    second, rows = _run(tmp_path, variants=["mha", "gqa-2", "mqa"],
                        conversions=["mqa", "gqa-2"], save_checkpoints=True)
    assert trained == ["mha", "gqa-2", "mqa"]
    assert [r["model"] for r in rows] == ["mha", "gqa-2", "mqa", "mha->mqa", "mha->gqa-2"]
    old, new = first["results"], second["results"]
    assert new["variants"][:2] == old["variants"]
    assert new["conversions"][0] == old["conversions"][0]
    # the converted model from the mha checkpoint = the one made from the trained weights
    mean_pooled = sweep.finished_parts(runner.load(tmp_path / "cfg.yaml").params,
                                       tmp_path / "out").load("mha->gqa-2")
    assert mean_pooled is not None and mean_pooled["row"]["kv_bytes_per_token"] == 64
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh, _ = _run(fresh_dir, variants=["mha"], conversions=["gqa-2"])
    assert fresh["results"]["conversions"][0]["eval_loss"] == pytest.approx(
        new["conversions"][1]["eval_loss"], rel=1e-5)
    # any other parameter makes the records stale: everything is trained again
    _run(tmp_path, variants=["mha", "gqa-2"], conversions=[], seed=4)
    assert trained[3:] == ["mha", "mha", "gqa-2"]
    record = json.loads((tmp_path / "out" / "finished" / "mha.json").read_text())
    assert record["params"]["seed"] == 4 and record["name"] == "mha"


def test_conversion_without_the_mha_weights_is_a_clear_error(tmp_path: Path) -> None:
    _run(tmp_path, variants=["mha"], conversions=[])
    with pytest.raises(FileNotFoundError, match="checkpoints/mha"):
        _run(tmp_path, variants=["mha"], conversions=["mqa"])


def test_fine_tuned_conversions_follow_their_conversion(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tuned = _count_calls(monkeypatch, "_finetune_conversion")
    trained = _count_calls(monkeypatch)
    # a first part without fine-tuning, then the same sweep with it: mha is not trained
    # again and the plain conversions are reused; only the fine-tuning runs
    first, _ = _run(tmp_path, variants=["mha"], conversions=["mqa", "mla-8"],
                    save_checkpoints=True)
    record, rows = _run(tmp_path, variants=["mha"], conversions=["mqa", "mla-8"],
                        save_checkpoints=True, finetune_steps=40)
    assert trained == ["mha"] and tuned == ["mha->mqa+ft40", "mha->mla-8+ft40"]
    assert [r["model"] for r in rows] == ["mha", "mha->mqa", "mha->mqa+ft40", "mha->mla-8",
                                          "mha->mla-8+ft40"]
    convs = record["results"]["conversions"]
    assert [convs[0], convs[2]] == first["results"]["conversions"]
    for plain, ft in ((convs[0], convs[1]), (convs[2], convs[3])):
        assert ft["before"] == {k: plain[k] for k in ("eval_loss", "answer_loss", "accuracy")}
        assert ft["kv_bytes_per_token"] == plain["kv_bytes_per_token"]
        assert "fine-tuned 40 steps" in ft["kind"] and ft["train_seconds"] > 0
        # 40 steps at lr 3e-3 from a barely trained model: the eval loss must fall
        assert ft["eval_loss"] < plain["eval_loss"] - 0.2
    by_model = {r["model"] for r in record["results"]["accuracy_by_distance"]}
    assert {"mha->mqa+ft40", "mha->mla-8+ft40"} <= by_model
    # a third run reuses everything
    _run(tmp_path, variants=["mha"], conversions=["mqa", "mla-8"], save_checkpoints=True,
         finetune_steps=40)
    assert trained == ["mha"] and len(tuned) == 2
