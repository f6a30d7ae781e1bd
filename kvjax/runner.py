"""Config-driven experiments: a YAML file in, a results folder out.

A config names an experiment and its parameters::

    experiment: paged-vs-dense
    output_dir: experiments/paged_vs_dense/results   # optional
    params:
      num_requests: 200

Each experiment is a module ``experiments.<name with - as _>.experiment`` exposing a frozen
dataclass ``Params`` (every parameter with its default) and
``run(params, out_dir) -> dict``, which writes its CSV and PNG files into ``out_dir``
and returns the results. The runner checks the whole config before any work (an
unknown experiment, key or parameter is an error naming it), then writes
``results.json`` (results + resolved config + environment) and ``config.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib
import json
import platform
import time
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kvjax.yaml_config import coerce, read_yaml

EXPERIMENTS = ("paged-vs-dense", "kv-cost", "kv-size-table", "cache-speedup", "prefix-sharing",
               "tiered-cache", "attention-sweep")
_TOP_KEYS = {"experiment", "params", "output_dir"}


class ExperimentConfigError(ValueError):
    """A run config names something that does not exist or has a bad value."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A resolved run: which experiment, its full parameters, where results go."""

    experiment: str  # one of EXPERIMENTS
    params: Any  # the experiment's Params dataclass, defaults filled in
    output_dir: Path  # folder for results.json, config.yaml, CSV and PNG


def _module(name: str) -> types.ModuleType:
    if name not in EXPERIMENTS:
        raise ExperimentConfigError(
            f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"experiments.{name.replace('-', '_')}.experiment")


def resolve(raw: dict[str, Any], default_dir: Path | None = None) -> RunConfig:
    """Validate a parsed YAML config and fill in defaults; raises ExperimentConfigError."""
    if not isinstance(raw, dict):
        raise ExperimentConfigError("a run config must be a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ExperimentConfigError(f"unknown config keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
    if "experiment" not in raw:
        raise ExperimentConfigError("config has no 'experiment' key")
    name = raw["experiment"]
    module = _module(name)
    params_cls = module.Params
    given = raw.get("params") or {}
    if not isinstance(given, dict):
        raise ExperimentConfigError("params must be a mapping")
    hints = typing.get_type_hints(params_cls)
    fields = {f.name for f in dataclasses.fields(params_cls)}
    bad = sorted(set(given) - fields)
    if bad:
        raise ExperimentConfigError(
            f"unknown parameter(s) {bad} for experiment {name!r}; known: {sorted(fields)}")
    values = {k: coerce(f"params.{k}", v, hints[k], ExperimentConfigError)
              for k, v in given.items()}
    try:
        params = params_cls(**values)
    except (TypeError, ValueError) as err:
        raise ExperimentConfigError(f"bad parameters for {name!r}: {err}") from err
    default = default_dir or Path("experiments") / name.replace("-", "_") / "results"
    return RunConfig(name, params, Path(raw.get("output_dir") or default))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["steps=10", "variants=[mha, mqa]"]`` -> ``{"steps": 10, "variants": ["mha", "mqa"]}``.

    Each value is read as YAML, so numbers, lists and strings come out as in a config
    file; the parameters are checked with the rest of the config.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentConfigError(f"override {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ExperimentConfigError(f"override {item!r}: value is not valid YAML: {err}"
                                        ) from err
    return out


def load(path: str | Path, output_dir: str | Path | None = None,
         overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and resolve a YAML run config; ``overrides`` replace entries of its params."""
    raw = read_yaml(path, ExperimentConfigError)
    if overrides:
        if not isinstance(raw, dict) or not isinstance(raw.get("params") or {}, dict):
            raise ExperimentConfigError(f"{path}: params must be a mapping")
        raw = {**raw, "params": {**(raw.get("params") or {}), **overrides}}
    cfg = resolve(raw)
    return dataclasses.replace(cfg, output_dir=Path(output_dir)) if output_dir else cfg


def environment() -> dict[str, Any]:
    """Where and with what a result was produced."""
    import jax
    import numpy as np

    devices = jax.devices()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: dataclasses and tuples to dicts and lists, numpy
    scalars to Python numbers, paths to strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rows as CSV; the header is every key in first-seen order (missing cells empty)."""
    rows = list(rows)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run a resolved config; write results.json and config.yaml; return the results."""
    module = _module(cfg.experiment)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"experiment": cfg.experiment, "output_dir": str(cfg.output_dir),
                "params": jsonable(cfg.params)}
    (cfg.output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    start = time.perf_counter()
    results = module.run(cfg.params, cfg.output_dir)
    record = {"experiment": cfg.experiment, "config": resolved, "environment": environment(),
              "seconds": round(time.perf_counter() - start, 3), "results": jsonable(results)}
    (cfg.output_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
