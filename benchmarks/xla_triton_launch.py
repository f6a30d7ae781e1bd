"""jax-triton's host custom call vs XLA's own Triton custom call, same kernel (GPU).

The fused layer's ``matmul_residual`` kernel at the o-projection shape (8 rows, 896 ->
896, bf16) launched (a) through jax-triton (``triton_kernel_call``), (b) as XLA's Triton
custom call (``pallas_kernels.triton_launch.xla_triton_call``), against (c) the same math
in XLA. Checks (b) equals (a) bit for bit, then times 24-call chains of each (one of 24
weight sets a call, the output fed back as the next residual; ``time_chained`` slope)
and one chain with a profiler trace (kernel time vs span per call).

GPU: python benchmarks/xla_triton_launch.py
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import chained_calls, time_chained
from kvjax.analysis.gpu_trace import gpu_kernel_events, kernel_summary
from pallas_kernels.triton_fused_layer import matmul_launch, matmul_residual_reference
from pallas_kernels.triton_launch import xla_triton_call
from pallas_kernels.triton_layer_kernels import matmul_residual_kernel


def main() -> None:
    from jax_triton import triton_call

    rng = np.random.default_rng(0)
    batch, k_dim, n = 8, 896, 896
    a = jnp.asarray(rng.standard_normal((batch, k_dim)), jnp.bfloat16)
    r0 = jnp.asarray(rng.standard_normal((batch, n)), jnp.bfloat16)
    ws = [jnp.asarray(rng.standard_normal((k_dim, n)) * k_dim ** -0.5, jnp.bfloat16)
          for _ in range(24)]
    grid, meta = matmul_launch(batch, k_dim, n, jnp.bfloat16, has_bias=False, block_n=32,
                               block_k=128)
    out = jax.ShapeDtypeStruct((batch, n), jnp.bfloat16)

    def via(launch: Any) -> Any:
        def fn(r: jax.Array, w: jax.Array) -> jax.Array:
            return launch(a, w, r, r, kernel=matmul_residual_kernel, out_shape=out, grid=grid,
                          num_warps=4, num_stages=4, name="mm", **meta)
        return fn

    fns = {"jax-triton": via(triton_call), "xla-triton": via(xla_triton_call),
           "xla": lambda r, w: matmul_residual_reference(a, w, None, r)}
    got = {k: np.asarray(jax.jit(f)(r0, ws[0]).astype(jnp.float32)) for k, f in fns.items()}
    print(f"xla-triton == jax-triton bitwise: {np.array_equal(got['xla-triton'], got['jax-triton'])}; "
          f"max |xla-triton - xla| {np.abs(got['xla-triton'] - got['xla']).max():.3e}", flush=True)
    sets = [(r0, w) for w in ws]
    for name, f in fns.items():
        t = time_chained(f, sets, iters=24, reps=5)
        chain = chained_calls(f, 24)
        jax.block_until_ready(chain(tuple(sets)))
        summary = kernel_summary(gpu_kernel_events(partial(chain, tuple(sets))), 24)
        print(f"  {name:<11} {1e6 * t:6.2f} us/call (slope); trace: "
              f"{summary['kernels_per_step']:.1f} kernels/call, kernel "
              f"{summary['kernel_us_per_step']:.2f} us/call, span "
              f"{summary['span_us_per_step']:.2f} us/call", flush=True)


if __name__ == "__main__":
    main()
