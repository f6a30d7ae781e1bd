"""Reading YAML run configs into typed dataclass fields, shared by ``kvjax run`` and
``kvjax serve-bench``: one place decides what a bad file or a mistyped value says."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed contents of ``path``; ``error`` if it is missing or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None


def coerce(where: str, value: Any, kind: Any, error: type[Exception]) -> Any:
    """``value`` checked against a field type (int, float, bool, str, ``tuple[X, ...]``);
    ints become floats where a float is wanted, lists become tuples. ``where`` names the
    field in the message of ``error``."""
    if typing.get_origin(kind) is tuple:
        (inner, *_rest) = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise error(f"{where} must be a list, got {value!r}")
        return tuple(coerce(where, v, inner, error) for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise error(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise error(f"{where} must be a string, got {value!r}")
    return value
