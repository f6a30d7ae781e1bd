"""Parts of an experiment saved as they finish, so a run cut off by a time limit, or a
sweep split over several runs, picks up where it stopped.

A part (one trained variant, one (workload, pool, mode) setting ...) is one JSON file
``folder/<name>.json`` holding its result and the parameters it was made with. A later
run with the same parameters loads it instead of recomputing it; a record made with other
parameters is reported and ignored (then overwritten). A parameter added after a record
was made is taken to have had its default value then: the record stays valid while the
parameter is at that default.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvjax.runner import jsonable


@dataclasses.dataclass(frozen=True)
class FinishedParts:
    """The finished parts in ``folder`` that were made with ``params`` (JSON types)."""

    folder: Path
    params: dict[str, Any]
    # Fields at their default value: a record made before such a field existed (so
    # without it) was made with what the default computes, and stays valid.
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def keyed_by(cls, folder: Path, params: Any, *, ignore: Sequence[str] = ()
                 ) -> FinishedParts:
        """Parts keyed by every field of the dataclass ``params`` except ``ignore`` (the
        fields that choose which parts run, not what a part computes)."""
        key = jsonable(params)
        missing = [name for name in ignore if name not in key]
        if missing:
            raise ValueError(f"cannot ignore {missing}: not fields of {type(params).__name__}")
        kept = {k: v for k, v in key.items() if k not in ignore}
        defaults = {f.name: jsonable(f.default) for f in dataclasses.fields(params)
                    if f.name in kept and f.default is not dataclasses.MISSING
                    and jsonable(f.default) == kept[f.name]}
        return cls(folder, kept, defaults)

    def path(self, name: str) -> Path:
        """The record of part ``name`` (characters outside ``[A-Za-z0-9._=-]`` become
        ``-``, so ``mha->mqa`` is ``mha--mqa.json``)."""
        if not name:
            raise ValueError("a part needs a non-empty name")
        return self.folder / f"{re.sub(r'[^A-Za-z0-9._=-]', '-', name)}.json"

    def load(self, name: str) -> dict[str, Any] | None:
        """Part ``name``'s saved result if it was made with these parameters, else None."""
        path = self.path(name)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("name") != name:
            tqdm.write(f"{path}: holds part {record.get('name')!r}; recomputing {name}")
            return None
        made = record.get("params")
        if isinstance(made, dict):  # fields added since, at their defaults, match
            made = {**{k: v for k, v in self.defaults.items() if k not in made}, **made}
        if made != self.params:
            tqdm.write(f"{path}: made with other parameters; recomputing {name}")
            return None
        tqdm.write(f"{name}: reusing the result in {path}")
        result: dict[str, Any] = record["result"]
        return result

    def save(self, name: str, result: dict[str, Any]) -> None:
        """Write part ``name``'s result (atomically: a run killed mid-write leaves the old
        record or none, never half of one)."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        record = {"name": name, "params": self.params, "result": jsonable(result)}
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)
