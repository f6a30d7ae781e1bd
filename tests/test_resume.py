"""FinishedParts: records round-trip, stale ones are ignored, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvjax.resume import FinishedParts


def test_a_saved_part_loads_back_only_with_the_same_parameters(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    value = float(rng.random())
    parts = FinishedParts(tmp_path / "f", {"seed": 1, "sizes": [2, 3]})
    assert parts.load("mha->mqa") is None
    parts.save("mha->mqa", {"row": {"loss": np.float32(value), "shape": (2, 3)}})
    assert parts.load("mha->mqa") == {"row": {"loss": pytest.approx(value, rel=1e-6),
                                              "shape": [2, 3]}}
    assert list((tmp_path / "f").iterdir()) == [parts.path("mha->mqa")]  # no .tmp left
    assert FinishedParts(tmp_path / "f", {"seed": 2, "sizes": [2, 3]}).load("mha->mqa") is None
    assert parts.load("mha-mqa") is None  # another name


def test_names_that_map_to_one_file_do_not_read_each_other(tmp_path: Path) -> None:
    parts = FinishedParts(tmp_path, {})
    parts.save("a>b", {"x": 1})
    assert parts.path("a>b") == parts.path("a<b")
    assert parts.load("a<b") is None and parts.load("a>b") == {"x": 1}
    assert json.loads(parts.path("a>b").read_text())["name"] == "a>b"
    with pytest.raises(ValueError, match="non-empty"):
        parts.path("")


def test_keyed_by_drops_only_the_named_fields(tmp_path: Path) -> None:
    from experiments.prefix_sharing.experiment import Params

    parts = FinishedParts.keyed_by(tmp_path, Params(), ignore=("workloads", "pool_blocks"))
    assert "workloads" not in parts.params and parts.params["system_len"] == 512
    other = FinishedParts.keyed_by(tmp_path, Params(workloads=("few-shot",), pool_blocks=(64,)),
                                   ignore=("workloads", "pool_blocks"))
    assert other.params == parts.params
    with pytest.raises(ValueError, match="pools"):
        FinishedParts.keyed_by(tmp_path, Params(), ignore=("pools",))


def test_a_field_added_later_matches_old_records_only_at_its_default(tmp_path: Path) -> None:
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Old:
        seed: int = 0

    @dataclasses.dataclass(frozen=True)
    class New:
        seed: int = 0
        attention: str = "xla"

    FinishedParts.keyed_by(tmp_path, Old(seed=3)).save("a", {"x": 1})
    assert FinishedParts.keyed_by(tmp_path, New(seed=3)).load("a") == {"x": 1}
    assert FinishedParts.keyed_by(tmp_path, New(seed=3, attention="triton")).load("a") is None
    assert FinishedParts.keyed_by(tmp_path, New(seed=4)).load("a") is None
    # A record that has the field is compared as saved, not defaulted.
    FinishedParts.keyed_by(tmp_path, New(seed=3, attention="triton")).save("b", {"x": 2})
    assert FinishedParts.keyed_by(tmp_path, New(seed=3)).load("b") is None
    assert FinishedParts.keyed_by(tmp_path, New(seed=3, attention="triton")).load("b") == {"x": 2}
