"""Shared fixtures: tiny Hugging Face checkpoints built locally (no download), and a
full disk for the L3 store."""

from __future__ import annotations

import os

# Before anything imports triton (transformers' model modules do): every @triton.jit
# kernel in the tests runs in Triton's interpreter on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable
from pathlib import Path

import jax
import pytest

from kvjax.models import LoadedModel, load_checkpoint
from kvjax.models.tiny import build_tiny_checkpoint

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with Llama-3 RoPE scaling, attention bias, untied head, GQA 4:2."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llama"), family="llama",
                                 llama3_rope_scaling=True, attention_bias=True,
                                 max_position_embeddings=256)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with q/k/v bias and tied embeddings, GQA 4:2."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), family="qwen2",
                                 max_position_embeddings=256, seed=1)


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> LoadedModel:
    return load_checkpoint(llama_dir)


@pytest.fixture(scope="session")
def qwen(qwen_dir: Path) -> LoadedModel:
    return load_checkpoint(qwen_dir)


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``disk_full(backend)`` makes every later L3 entry write of ``backend`` fail as on a
    full disk (ENOSPC), until the test ends or ``monkeypatch.undo()``."""

    def fill(backend: str) -> None:
        if backend == "raw":  # the rename of the written temp file
            def full(*args: object, **kwargs: object) -> None:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(os, "replace", full)
        else:  # tensorstore reports an OS error as a ValueError carrying its code
            import tensorstore as ts

            def ts_full(*args: object, **kwargs: object) -> None:
                raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: "
                                 "No space left on device [os_error_code='28']")

            monkeypatch.setattr(ts.KvStore, "write", ts_full)

    return fill
