"""The command line: JSON output, text prompts, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvjax.cli import main
from kvjax.engine.generate import generate
from kvjax.models import LoadedModel


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cache", ["dense", "paged", "none"])
def test_generate_json_token_ids(capsys: pytest.CaptureFixture[str], llama_dir: Path,
                                 llama: LoadedModel, cache: str) -> None:
    code, out, _ = _run(capsys, "generate", "--model", str(llama_dir), "--token-ids", "5,6,7",
                        "9", "--max-new-tokens", "6", "--cache", cache, "--stop-ids", "",
                        "--block-size", "4", "--json")
    assert code == 0
    result = json.loads(out)
    expected = generate(llama.model, llama.params, [[5, 6, 7], [9]], max_new_tokens=6)
    assert [r["token_ids"] for r in result["results"]] == expected.tokens
    assert [r["prompt_ids"] for r in result["results"]] == [[5, 6, 7], [9]]
    assert all("text" in r for r in result["results"])


def test_generate_text_prompt(capsys: pytest.CaptureFixture[str], llama_dir: Path) -> None:
    code, out, _ = _run(capsys, "generate", "--model", str(llama_dir), "--prompt",
                        "yesterday I", "--max-new-tokens", "3", "--stop-ids", "", "--json")
    assert code == 0
    (item,) = json.loads(out)["results"]
    assert len(item["prompt_ids"]) == 2 and len(item["token_ids"]) == 3
    assert len(item["text"].split()) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/no/such/dir", "--token-ids", "1"], "does not exist"),
    (["--token-ids", "1,100000"], "outside the vocabulary"),
    (["--token-ids", ",".join(["1"] * 300)], "exceed the model's context"),
    (["--token-ids", "1,2", "--max-new-tokens", "-1"], "must be >= 0"),
    (["--token-ids", "1,x"], "comma-separated integers"),
    (["--token-ids", "1", "--temperature", "-1"], "temperature"),
    (["--token-ids", "1,2", "--cache", "paged", "--num-blocks", "0"], "pool too small"),
])
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], llama_dir: Path,
                               args: list[str], message: str) -> None:
    argv = ["generate", *(["--model", str(llama_dir)] if "--model" not in args else []), *args]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvjax.cli", "generate", "--model",
                           str(tmp_path / "missing"), "--token-ids", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("kvjax generate: error:")


@pytest.mark.parametrize(("override", "message"), [
    ("batchsize=3", "batchsize"),
    ("contexts", "not KEY=VALUE"),
])
def test_run_bad_override_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      override: str, message: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("experiment: kv-cost\nparams: {batch: 2}\n")
    code, out, err = _run(capsys, "run", str(cfg), "--output-dir", str(tmp_path / "o"),
                          "--set", override)
    assert code == 2 and out == "" and not (tmp_path / "o").exists()
    assert len(err.strip().splitlines()) == 1 and message in err
