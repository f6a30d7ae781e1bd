"""``pallas_kernels.triton_launch``: ``xla_triton_call`` lowers a Triton kernel to XLA's Triton custom call (checked on the
CPU by lowering for CUDA, in a process without the Triton interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp
    from pallas_kernels.triton_fused_layer import matmul_launch
    from pallas_kernels.triton_layer_kernels import matmul_residual_kernel
    from pallas_kernels.triton_decode_kernel import paged_decode_kernel
    from pallas_kernels.triton_paged_decode import decode_launch
    from pallas_kernels.triton_launch import xla_triton_call

    a = jnp.ones((5, 96), jnp.bfloat16); w = jnp.ones((96, 40), jnp.bfloat16)
    r = jnp.ones((5, 40), jnp.bfloat16)
    grid, meta = matmul_launch(5, 96, 40, jnp.bfloat16, has_bias=False, block_n=16,
                               block_k=32)
    def mm(a, w, r):
        return xla_triton_call(a, w, r, r, kernel=matmul_residual_kernel,
                               out_shape=jax.ShapeDtypeStruct((5, 40), jnp.bfloat16),
                               grid=grid, num_warps=4, num_stages=3, **meta)
    text = jax.jit(mm).trace(a, w, r).lower(lowering_platforms=("cuda",)).as_text()

    q = jnp.ones((2, 4, 64), jnp.float32); pool = jnp.ones((3, 8, 16, 2, 64), jnp.float32)
    tables = jnp.zeros((2, 4), jnp.int32); lengths = jnp.ones((2,), jnp.int32)
    launch = decode_launch(q.shape, pool.shape, 4, q.dtype, layer=2, block_tokens=None,
                           num_splits=1, num_warps=4, num_stages=2)
    def dec(q, k, v, t, n):
        return xla_triton_call(q, k, v, t, n, *launch.scalars, kernel=paged_decode_kernel,
                               out_shape=[jax.ShapeDtypeStruct((2, 4, 64), jnp.float32),
                                          jax.ShapeDtypeStruct((2, 2, 1, 2), jnp.float32),
                                          jax.ShapeDtypeStruct((2, 2, 1, 2), jnp.float32)],
                               grid=launch.grid, num_warps=4, num_stages=2,
                               **dict(launch.meta))
    dtext = jax.jit(dec).trace(q, pool, pool, tables, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    print(json.dumps({
        "calls": text.count("stablehlo.custom_call @__gpu$xla.gpu.triton"),
        "grid": re.findall(r"grid_[xyz] = (\\d+) : i32", text),
        "func": "tt.func public @matmul_residual_kernel" in text,
        "operands": re.search(r"xla.gpu.triton\\(([^)]*)\\)", text).group(1).count("%"),
        "decode_calls": dtext.count("xla.gpu.triton"),
        "decode_operands": re.search(r"xla.gpu.triton\\(([^)]*)\\)", dtext).group(1).count("%"),
        "decode_scalars_gone": "i32 loc" not in dtext.split("tt.func public")[1].split(")")[0],
    }))
""")


def test_lowers_to_xla_triton_custom_call() -> None:
    """One custom call per launch with the grid and the kernel's Triton IR; the four
    array operands (residual passed twice: bias slot and residual); a decode launch's
    Python-int scalars (layer, num_pages) become constexprs, not operands."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["calls"] == 1
    assert got["grid"] == ["3", "1", "1"]  # ceil(40 / 16) column blocks, one row block
    assert got["func"]
    assert got["operands"] == 4
    assert got["decode_calls"] == 1
    assert got["decode_operands"] == 5  # q, k, v, tables, lengths
    assert got["decode_scalars_gone"]


def test_launcher_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """XLA's Triton custom call unless KVJAX_TRITON_LAUNCH says "jax-triton"; anything
    else is an error that names the choices."""
    from pallas_kernels.triton_launch import LAUNCH_ENV, triton_launcher

    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    assert triton_launcher() == "xla"
    monkeypatch.setenv(LAUNCH_ENV, "jax-triton")
    assert triton_launcher() == "jax-triton"
    monkeypatch.setenv(LAUNCH_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="KVJAX_TRITON_LAUNCH must be one of"):
        triton_launcher()


def test_unavailable_reason_asks_for_jax_triton_only_under_its_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU without ``jax_triton`` the kernels run under the default XLA launch; under
    ``KVJAX_TRITON_LAUNCH=jax-triton`` the reason names the missing package; off the GPU
    the reason names the backend."""
    import importlib

    import jax

    from pallas_kernels import triton_paged_decode
    from pallas_kernels.triton_launch import LAUNCH_ENV

    real_import = importlib.import_module

    def no_jax_triton(name: str, package: str | None = None) -> object:
        if name == "jax_triton":
            raise ImportError("No module named 'jax_triton'")
        return real_import(name, package)

    monkeypatch.setattr(triton_paged_decode.importlib, "import_module", no_jax_triton)
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    assert "not gpu" in str(triton_paged_decode.triton_unavailable_reason())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert triton_paged_decode.triton_unavailable_reason() is None
    monkeypatch.setenv(LAUNCH_ENV, "jax-triton")
    assert "cannot import jax_triton" in str(triton_paged_decode.triton_unavailable_reason())
