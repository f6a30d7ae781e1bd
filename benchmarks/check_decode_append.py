"""GPU check of the Triton decode-append path against the XLA path of the paged cache.

One decode step of ``PagedCache.update_and_attend`` at layer 1 of a 3-layer pool (8 rows,
14 query heads over 2 KV heads, head_dim 64, blocks of 16; random positions, padding rows
included): ``attention="triton"`` (``triton_paged_decode_append``, jitted so the pools are
aliased in and out) against ``"xla"`` (scatter + gather reference). Prints the largest
output difference and whether the written pools are bit-identical, float32 and bfloat16.

GPU: python benchmarks/check_decode_append.py
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.paged import PagedCache


def main() -> None:
    rng = np.random.default_rng(0)
    layers, pages, page, kv_heads, dim, heads, batch, blocks = 3, 64, 16, 2, 64, 14, 8, 8
    for dtype in (jnp.float32, jnp.bfloat16):
        tables = jnp.asarray(rng.permutation(pages)[:batch * blocks].reshape(batch, blocks),
                             jnp.int32)
        shape = (layers, pages, page, kv_heads, dim)
        xla = PagedCache(k_pages=jnp.asarray(rng.standard_normal(shape), dtype),
                         v_pages=jnp.asarray(rng.standard_normal(shape), dtype),
                         block_tables=tables, lengths=jnp.zeros((batch,), jnp.int32))
        positions = jnp.asarray(rng.integers(-1, blocks * page, (batch, 1)), jnp.int32)
        q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), dtype)
        k = jnp.asarray(rng.standard_normal((batch, 1, kv_heads, dim)), dtype)
        v = jnp.asarray(rng.standard_normal((batch, 1, kv_heads, dim)), dtype)
        want, want_cache = xla.update_and_attend(1, q, k, v, positions)
        triton = dataclasses.replace(xla, attention="triton")
        got, got_cache = jax.jit(lambda c, *a: c.update_and_attend(1, *a))(
            triton, q, k, v, positions)
        err = float(jnp.max(jnp.abs(want.astype(jnp.float32) - got.astype(jnp.float32))))
        same = (bool(jnp.array_equal(want_cache.k_pages, got_cache.k_pages))
                and bool(jnp.array_equal(want_cache.v_pages, got_cache.v_pages)))
        print(f"{jnp.dtype(dtype).name}: max |triton - xla| {err:.2e}, pools equal {same}",
              flush=True)


if __name__ == "__main__":
    main()
