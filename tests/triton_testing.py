"""Triton kernels on CPU: jax-triton replaced by Triton's interpreter, and the sm_90
compile check (``triton_compile_check.py``) run in a process of its own.

jax-triton needs a GPU build of jaxlib, so the autouse fixture ``interpreted_jax_triton``
(import it into a test module) selects jax-triton as the kernels' launcher
(``pallas_kernels.triton_launch``) and replaces ``jax_triton`` by a module whose
``triton_call`` keeps jax-triton's calling convention (arrays and Python scalars in
order, then the outputs, then the meta-parameters as keywords) and runs the same
``@triton.jit`` kernel on torch CPU tensors under ``TRITON_INTERPRET=1`` through
``jax.pure_callback``. Import this module before anything imports ``triton``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit interprets

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")


def _to_torch(x: np.ndarray | jax.Array) -> Any:
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(x))


def _from_torch(x: Any) -> np.ndarray:
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(jnp.bfloat16)
    return np.asarray(x.numpy())


def _interpreted_triton_call(*args: Any, kernel: Any,
                             out_shape: jax.ShapeDtypeStruct | list[jax.ShapeDtypeStruct],
                             grid: tuple[int, ...], num_warps: int, num_stages: int,
                             name: str, input_output_aliases: dict[int, int] | None = None,
                             **meta: Any) -> jax.Array | list[jax.Array]:
    """``jax_triton.triton_call`` on the Triton interpreter (host callback). An aliased
    output (``input_output_aliases``: array-argument index -> output index) is its input's
    buffer, as on the GPU: the kernel receives it twice and it comes back as written. One
    output shape (not a list) gives one array, as jax-triton does."""
    del name
    if isinstance(out_shape, jax.ShapeDtypeStruct):
        return _interpreted_triton_call(*args, kernel=kernel, out_shape=[out_shape], grid=grid,
                                        num_warps=num_warps, num_stages=num_stages, name="",
                                        input_output_aliases=input_output_aliases, **meta)[0]
    is_scalar = [isinstance(a, bool | int | float) for a in args]
    arrays = [a for a, s in zip(args, is_scalar, strict=True) if not s]
    aliases = {o: i for i, o in (input_output_aliases or {}).items()}

    def run(*host: jax.Array) -> tuple[np.ndarray, ...]:
        inputs = [_to_torch(x) for x in host]
        it = iter(inputs)
        launch_args = [a if s else next(it) for a, s in zip(args, is_scalar, strict=True)]
        outs = [inputs[aliases[j]] if j in aliases else
                torch.empty(o.shape, dtype=getattr(torch, jnp.dtype(o.dtype).name))
                for j, o in enumerate(out_shape)]
        kernel[grid](*launch_args, *outs, num_warps=num_warps, num_stages=num_stages, **meta)
        return tuple(_from_torch(o) for o in outs)

    return list(jax.pure_callback(run, tuple(out_shape), *arrays))


@pytest.fixture(autouse=True)
def interpreted_jax_triton(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``jax_triton`` -> the interpreter stand-in; numpy >= 2.4 fix for triton 3.6's
    interpreter (it calls int() on 1-element arrays; triton-lang/triton#9171)."""
    from triton.runtime import interpreter

    monkeypatch.setitem(sys.modules, "jax_triton",
                        types.SimpleNamespace(triton_call=_interpreted_triton_call))
    monkeypatch.setenv("KVJAX_TRITON_LAUNCH", "jax-triton")  # the launcher replaced here
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)
    yield


def compile_for_h100(configs: list[list[Any]], kernel: str = "decode") -> list[dict[str, int]]:
    """Run ``triton_compile_check.py`` (sm_90 compile, no GPU) for ``kernel`` ("decode",
    "prefill" or "layer") in a process of its own (without TRITON_INTERPRET); one result per
    config."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    args = [json.dumps(configs)] if kernel == "decode" else [kernel, json.dumps(configs)]
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout))
