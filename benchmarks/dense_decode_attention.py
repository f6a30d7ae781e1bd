"""Decode attention over a dense token-major cache [B, S, K, D]: XLA formulations compared.

One layer, one query token per sequence. Prints time per call and achieved bandwidth
(K+V bytes / time) as a fraction of the read bandwidth measured in the same run.
Run: python benchmarks/dense_decode_attention.py [--batch 32 --context 16384 ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import read_bandwidth, time_queued
from kvjax.attention import sdpa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    b, s, h, kh, d = args.batch, args.context, args.heads, args.kv_heads, args.head_dim
    dt = jnp.bfloat16
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, 1, h, d), dt)
    k = jax.random.normal(ks[1], (b, s, kh, d), dt)
    v = jax.random.normal(ks[2], (b, s, kh, d), dt)
    q_pos = jax.random.randint(ks[3], (b, 1), s // 2, s)
    slot = jnp.arange(s)[None, :]
    kv_bytes = 2 * k.nbytes

    read_bw = read_bandwidth(512)

    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # as if stored head-major
    mask = (slot <= q_pos)[:, None, :]

    def head_major(q: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
        qg = q[:, 0].reshape(b, kh, h // kh, d)
        scores = jnp.einsum("bkgd,bksd->bkgs", qg, kt, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None], scores * d**-0.5, -1e30)
        out = jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(scores, -1).astype(dt), vt)
        return out.reshape(b, h, d)

    variants = {
        "sdpa einsum, token-major": (jax.jit(lambda q, k, v, m: sdpa(q, k, v, m)[:, 0]),
                                     (q, k, v, mask)),
        "einsum, cache stored head-major": (jax.jit(head_major), (q, kt, vt, mask)),
    }
    ref = np.asarray(variants["sdpa einsum, token-major"][0](q, k, v, mask), np.float32)
    err = max(np.linalg.norm(np.asarray(fn(*a), np.float32) - ref) / np.linalg.norm(ref)
              for fn, a in variants.values())
    print(f"device {jax.devices()[0].device_kind}; read bandwidth {read_bw / 1e9:.0f} GB/s; "
          f"B={b} S={s} H={h} K={kh} D={d} bf16; K+V {kv_bytes / 2**20:.0f} MiB; "
          f"max rel err vs sdpa {err:.2e}")
    print(f"{'variant':<40}{'us':>10}{'% read BW':>12}")
    for name, (fn, fn_args) in variants.items():
        t = time_queued(fn, [fn_args], iters=30)
        print(f"{name:<40}{t * 1e6:>10.1f}{100 * kv_bytes / t / read_bw:>11.1f}%")


if __name__ == "__main__":
    main()
