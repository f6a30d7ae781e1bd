"""GPU check of the fused decode step against the Flax forward, Qwen2.5-0.5B shape.

One decode step (``kvjax.models.fused_decode.fused_decode_step`` vs ``Decoder.apply``
over a ``PagedCache`` with the Triton decode kernel) on random weights, 8 and 32 rows at
random contexts up to 600 (one padding row), float32 and bfloat16. Prints the largest
logit difference (and the logits' scale), the share of rows whose greedy token agrees,
and the largest difference of the written pools. Float32: XLA's matmuls run at TF32 by
default on the GPU, the kernels' at full float32, so the difference is XLA's rounding.

``--reference-attention xla`` makes the reference the Flax forward over the XLA gather
attention (no Triton program in it) and checks the Flax step with the Triton decode
kernel against it too: with ``KVJAX_TRITON_LAUNCH=xla`` that checks every kernel launched
as XLA's own Triton custom call.

GPU: python benchmarks/check_fused_decode.py [--reference-attention xla] [--dtypes bfloat16]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.presets import get_preset
from kvjax.cache.paged import PagedCache
from kvjax.models.fused_decode import fused_decode_step
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from pallas_kernels.triton_launch import triton_launcher

BLOCK = 16


@partial(jax.jit, static_argnums=(0, 7))
def flax_step(model: Decoder, params: Any, k: jax.Array, v: jax.Array, tokens: jax.Array,
              pos: jax.Array, tables: jax.Array, attention: str = "triton",
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Flax forward over a PagedCache with the given attention backend."""
    cache = PagedCache(k_pages=k, v_pages=v, block_tables=tables,
                       lengths=jnp.maximum(pos, 0), attention=attention)
    out: Any = model.apply({"params": params}, tokens[:, None], pos[:, None], cache,
                           logit_index=jnp.zeros_like(tokens))
    logits, new = out
    return logits, new.k_pages, new.v_pages


def checked_step(label: str, model: Decoder, params: Any, k: jax.Array, v: jax.Array,
                 tokens: jax.Array, pos: jax.Array, tables: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step checked: "fused" (``fused_decode_step``) or "flax-triton" (the Flax
    forward with the Triton decode kernel)."""
    if label == "fused":
        return jax.jit(fused_decode_step, static_argnums=1)(params, model.cfg, tokens, pos,
                                                             k, v, tables)
    return flax_step(model, params, k, v, tokens, pos, tables, "triton")


def report(name: str, want: jax.Array, got: jax.Array, pools: tuple[jax.Array, ...],
           real: np.ndarray) -> None:
    """One line: largest logit and pool differences, and greedy agreement on real rows."""
    w, g = np.asarray(want)[real], np.asarray(got)[real]
    agree = float((w.argmax(-1) == g.argmax(-1)).mean())
    wk, wv, gk, gv = pools
    pool = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in ((wk, gk), (wv, gv)))
    print(f"{name}: max logit diff {np.abs(w - g).max():.3e} (logits max "
          f"{np.abs(w).max():.2f}), greedy agreement {agree:.3f}, pools max diff "
          f"{pool:.3e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-attention", choices=("triton", "xla"), default="triton")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                    default=["float32", "bfloat16"], help="the dtypes checked, in order")
    args = ap.parse_args()
    ref = args.reference_attention
    print(f"launch: {triton_launcher()}, reference: "
          f"Flax forward with {ref} attention", flush=True)
    cfg = get_preset("qwen2.5-0.5b").to_model_config()
    rng = np.random.default_rng(0)
    failed: list[str] = []
    for dtype in map(jnp.dtype, args.dtypes):
        model = Decoder(cfg, dtype=dtype)
        params = random_params(cfg, dtype, 0)
        for batch in (8, 32):
            per_row = 40
            pages = batch * per_row
            tables = jnp.asarray(rng.permutation(pages).reshape(batch, per_row), jnp.int32)
            shape = (cfg.num_layers, pages, BLOCK, cfg.num_kv_heads, cfg.head_dim)
            k = jnp.asarray(rng.standard_normal(shape), dtype)
            v = jnp.asarray(rng.standard_normal(shape), dtype)
            positions = rng.integers(0, 600, batch).astype(np.int32)
            positions[-1] = -1
            pos = jnp.asarray(positions)
            tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)

            want, wk, wv = flax_step(model, params, k, v, tokens, pos, tables, ref)
            real = positions >= 0
            name = f"{jnp.dtype(dtype).name} batch {batch}"
            for label in ("fused", "flax-triton") if ref != "triton" else ("fused",):
                try:  # a failing row is reported; the others still run
                    got, gk, gv = checked_step(label, model, params, k, v, tokens, pos, tables)
                except Exception as err:
                    failed.append(f"{name} {label}")
                    print(f"{name} {label} vs flax-{ref}: FAILED: {type(err).__name__}: "
                          f"{str(err).splitlines()[0]}", flush=True)
                    continue
                report(f"{name} {label} vs flax-{ref}", want, got, (wk, wv, gk, gv), real)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
