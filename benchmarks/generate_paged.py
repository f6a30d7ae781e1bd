"""Greedy generation end to end: dense cache vs paged cache with XLA, Pallas or Triton
attention.

A preset-shaped model with random weights (default Qwen2.5-0.5B, bf16). Reports warm
wall time per ``generate`` call, decode tokens/s, and whether each path's tokens equal
the dense cache's. A backend that cannot run here is skipped with the reason; one that
fails is reported and the others still run.
Run: python benchmarks/generate_paged.py [--batch 8 --prompt 512 ...]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.presets import get_preset
from kvjax.engine.generate import generate
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from pallas_kernels.triton_paged_decode import triton_unavailable_reason


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    dtype = getattr(jnp, args.dtype)
    cfg = get_preset(args.model).to_model_config()
    model = Decoder(cfg, dtype=dtype)
    params = random_params(cfg, dtype, 0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    runs = {"dense": {"cache": "dense"},
            "paged xla": {"cache": "paged", "attention": "xla"},
            "paged pallas": {"cache": "paged", "attention": "pallas"},
            "paged triton": {"cache": "paged", "attention": "triton"}}
    outs: dict[str, list[list[int]]] = {}
    print(f"{jax.devices()[0].device_kind}: {args.model} {args.dtype}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens (warm calls, prefill included)")
    for name, kw in runs.items():
        if kw.get("attention") == "triton" and (reason := triton_unavailable_reason()):
            print(f"  {name:<14}skipped: {reason}", flush=True)
            continue

        def call(kw: dict = kw) -> list[list[int]]:
            return generate(model, params, prompts, max_new_tokens=args.new, **kw).tokens
        try:
            call()
            start = time.perf_counter()
            outs[name] = call()
            seconds = time.perf_counter() - start
        except Exception as err:  # report and go on with the other paths
            print(f"  {name:<14}ERR {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        same = (f"{sum(a == b for a, b in zip(outs[name], outs['dense'], strict=True))}"
                f"/{args.batch}" if "dense" in outs else "n/a")
        print(f"  {name:<14}{seconds * 1e3:9.1f} ms  {args.batch * args.new / seconds:9.0f} tok/s"
              f"  sequences equal to dense: {same}", flush=True)


if __name__ == "__main__":
    main()
