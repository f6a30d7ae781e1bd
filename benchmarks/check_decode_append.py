"""GPU check of the Triton decode-append path against the XLA path of the paged cache.

One decode step of ``PagedCache.update_and_attend`` at layer 1 of a 3-layer pool (8 rows,
14 query heads over 2 KV heads, head_dim 64, blocks of 16; random positions, padding rows
included): ``attention="triton"`` (``triton_paged_decode_append``, jitted so the pools are
aliased in and out) against ``"xla"`` (scatter + gather reference). Prints the largest
output difference and whether the written pools are bit-identical, float32 and bfloat16.
Then the split merge done in the kernel (the last split to finish merges, ordered by an
atomic count) against XLA's combine of the same kernel's partials, over many launches
at shapes with 2-8 splits: a missing memory ordering would show as launches that differ.

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

    merge_check(rng)


def merge_check(rng: np.random.Generator, calls: int = 200) -> None:
    """``calls`` launches each of the in-kernel merge and XLA's combine; the largest
    difference and how many launches differ by more than bf16 rounding."""
    from pallas_kernels.triton_paged_decode import triton_paged_decode_attention

    # batch, heads, kv_heads, head_dim, blocks of 16, splits
    for b, h, kv, d, blocks, splits in ((8, 32, 8, 128, 256, 4), (2, 14, 2, 64, 64, 8),
                                        (32, 32, 8, 128, 64, 2)):
        pages = b * blocks
        q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((pages, 16, kv, d)), jnp.bfloat16)
                for _ in range(2))
        tables = jnp.asarray(rng.permutation(pages).reshape(b, blocks), jnp.int32)
        lengths = jnp.asarray(rng.integers(0, blocks * 16 + 1, b), jnp.int32)
        fused, xla = (jax.jit(lambda *a, m=merge, n=splits: triton_paged_decode_attention(
            *a, num_splits=n, merge_in_kernel=m)) for merge in (True, False))
        want = np.asarray(xla(q, k, v, tables, lengths), np.float32)
        diffs = [float(np.max(np.abs(np.asarray(fused(q, k, v, tables, lengths), np.float32)
                                     - want))) for _ in range(calls)]
        print(f"merge {b}x{blocks * 16} {h}/{kv} heads d{d} sp{splits}: {calls} launches, "
              f"max |in-kernel - xla| {max(diffs):.2e}, launches over 1e-2: "
              f"{sum(x > 1e-2 for x in diffs)}", flush=True)


if __name__ == "__main__":
    main()
