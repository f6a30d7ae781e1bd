"""Where the serving engine's decode step spends its time (GPU).

The engine's decode burst (``kvjax.engine.engine._engine_decode_burst``: ``--steps``
decode forwards in one device loop, greedy) on a Qwen2.5-0.5B-shaped ``Decoder`` with
random bf16 weights, every row at context ``C`` over a paged pool (block 16). For each
(batch, context) and attention backend it reports:

* ms per token step (bursts queued back to back, median of repeats);
* the floor: (weight bytes + the KV bytes the step reads) / read bandwidth measured in
  this run, and the step time as a multiple of it;
* the same at half the depth (``layers / 2``): the per-layer slope and the fixed part
  (embedding, LM head, sampling, loop) of a step;
* with ``--trace``: a profiler trace of one burst, summarised as GPU kernels per token
  step, summed kernel time per step, and the kernels that take the most time.

``--attention fused`` is the burst through the fused Triton layer kernels
(``Engine(fused_decode=True)``: ``kvjax.models.fused_decode``) with the Triton decode
kernel; ``triton`` the Flax forward with it; ``fused=FILE`` the fused burst with each
layer piece launched as the JSON ``FusedLaunch`` in FILE says
(``fused_layer_kernels.py --launch-out`` writes one).

``--scatter-writes`` measures the decode step as it was before the decode-append kernel:
under ``triton`` the step's K/V written by two XLA scatters per layer and attended by
``triton_paged_decode_attention`` (an A/B of the fused write in one run).

``--combine reduce unrolled`` is an A/B of the split merge after the decode kernel
(``pallas_kernels.paged_decode.combine_splits``: reductions over the split axis, or
elementwise over the split slices), in this process.

``--split-programs 256 16`` is an A/B of the decode kernel's split rule
(``paged_decode.SPLIT_PROGRAMS``: splits for about that many programs, at most 8; 16 at 8
rows x 2 KV heads is one split, no merge kernel), in this process.

``--xla-flags`` runs the grid once per flag set, the environment's own first, each in a
child process of its own (XLA reads its flags once, at start, and a process keeps the
GPU memory it took), e.g. command buffers (CUDA graphs) off.

GPU (H100, ~4 min): python benchmarks/decode_step_profile.py --out $OUT/decode_profile.json
CPU check (tiny): python benchmarks/decode_step_profile.py --tiny
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis.bandwidth import read_bandwidth, time_queued
from kvjax.analysis.gpu_trace import gpu_kernel_events, kernel_summary
from kvjax.analysis.presets import get_preset
from kvjax.engine.engine import _engine_decode_burst
from kvjax.engine.generate import kv_bytes_per_token
from kvjax.engine.sampling import GREEDY, SamplingArrays
from kvjax.models.fused_decode import FusedLaunch
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from pallas_kernels import paged_decode

BLOCK = 16


def build(layers: int | None, tiny: bool) -> tuple[Decoder, Any]:
    cfg = get_preset("qwen2.5-0.5b").to_model_config(num_layers=layers)
    if tiny:
        import dataclasses

        cfg = dataclasses.replace(cfg, num_layers=layers or 2, hidden_size=64,
                                  intermediate_size=128, num_heads=4, num_kv_heads=2,
                                  head_dim=16, vocab_size=512)
    return Decoder(cfg, dtype=jnp.bfloat16), random_params(cfg, jnp.bfloat16, 0)


def burst_args(model: Decoder, batch: int, context: int, steps: int) -> tuple[Any, ...]:
    """Pool, tables and per-row inputs for ``batch`` rows decoding at ``context``."""
    cfg = model.cfg
    per_row = -(-(context + steps) // BLOCK)
    shape = (cfg.num_layers, batch * per_row, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    k = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), shape, jnp.bfloat16)
    tables = np.arange(batch * per_row, dtype=np.int32).reshape(batch, per_row)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, batch).astype(np.int32)
    positions = np.full((batch,), context, np.int32)
    active = np.full((batch,), steps, np.int32)
    sp = SamplingArrays.from_params([GREEDY] * batch)
    seeds = np.zeros((batch,), np.uint32)
    draws = np.zeros((batch,), np.int32)
    return k, v, tokens, positions, active, tables, sp, seeds, draws


def backend(attention: str) -> dict[str, Any]:
    """``_engine_decode_burst``'s keywords for a ``--attention`` value ("fused": the
    fused layer kernels with the Triton decode kernel at the default ``FusedLaunch``;
    "fused=FILE": the same with the launch read from a JSON file)."""
    if attention == "fused":
        return {"attention": "triton", "fused": FusedLaunch()}
    if attention.startswith("fused="):
        return {"attention": "triton", "fused": FusedLaunch.from_json(attention[6:])}
    return {"attention": attention}


def label(attention: str) -> str:
    """A short name for an ``--attention`` value ("fused=dir/best.json" -> "fused-best")."""
    if attention.startswith("fused="):
        return f"fused-{Path(attention[6:]).stem}"
    return attention


def step_seconds(model: Decoder, params: Any, args: tuple[Any, ...], steps: int,
                 attention: str, reps: int) -> float:
    """Median seconds per token step of bursts queued back to back (pool donated and
    threaded through, as the engine does)."""
    k, v, *rest = args
    state = {"k": k, "v": v}
    kw = backend(attention)  # once: a launch file is read outside the timed calls

    def call() -> jax.Array:
        ids, state["k"], state["v"] = _engine_decode_burst(
            model, params, state["k"], state["v"], *rest, steps=steps, all_greedy=True,
            **kw)
        return ids

    return time_queued(lambda: call(), [()], iters=10, reps=reps) / steps


def weight_bytes(params: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))


def trace_summary(model: Decoder, params: Any, args: tuple[Any, ...], steps: int,
                  attention: str) -> dict[str, Any]:
    """Profile one (warm) burst; GPU kernel events per token step from the trace."""
    k, v, *rest = args
    kw = backend(attention)
    ids, k, v = _engine_decode_burst(model, params, k, v, *rest, steps=steps,
                                     all_greedy=True, **kw)
    jax.block_until_ready(ids)
    try:
        events = gpu_kernel_events(lambda: _engine_decode_burst(
            model, params, k, v, *rest, steps=steps, all_greedy=True, **kw))
    except RuntimeError as err:
        return {"error": str(err)}
    return kernel_summary(events, steps)


def write_hlo(path: Path, model: Decoder, params: Any, args: tuple[Any, ...], steps: int,
              attention: str) -> None:
    """The burst's optimised HLO (after XLA's fusion passes) as text, and a count of its
    fusions by kind on stdout."""
    compiled = _engine_decode_burst.lower(model, params, *args, steps=steps, all_greedy=True,
                                          **backend(attention)).compile()
    text = compiled.as_text() or ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    kinds = collections.Counter(line.split("kind=")[1].split(",")[0].split(" ")[0]
                                for line in text.splitlines() if " fusion(" in line
                                and "kind=" in line)
    print(f"    hlo: {path} ({len(text) // 1024} KiB); fusions by kind: {dict(kinds)}")


def use_scatter_writes() -> None:
    """Route the paged cache's triton decode step through XLA scatters + the plain decode
    kernel instead of ``triton_paged_decode_append`` (for this process)."""
    from kvjax.cache import paged
    from pallas_kernels.triton_paged_decode import triton_paged_decode_attention

    def scatter_then_attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                            k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                            lengths: jax.Array, *, layer: int
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
        page, offset = paged.page_slots(tables, (lengths - 1)[:, None], k_pages.shape[2],
                                        k_pages.shape[1])
        k_pages = k_pages.at[layer, page, offset].set(k_new[:, None], mode="drop")
        v_pages = v_pages.at[layer, page, offset].set(v_new[:, None], mode="drop")
        out = triton_paged_decode_attention(q, k_pages, v_pages, tables, lengths, layer=layer)
        return out, k_pages, v_pages

    paged.triton_paged_decode_append = scatter_then_attend  # type: ignore[assignment]


def run_grid(a: argparse.Namespace) -> dict[str, Any]:
    if a.scatter_writes:
        use_scatter_writes()
    os.environ["KVJAX_TRITON_LAUNCH"] = a.launch
    bw = read_bandwidth(256 if a.tiny else 4096)
    print(f"{jax.devices()[0].device_kind}; read bandwidth {bw / 1e9:.0f} GB/s; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    full, full_params = build(None if not a.tiny else 2, a.tiny)
    half, half_params = build(full.cfg.num_layers // 2, a.tiny)
    wbytes = weight_bytes(full_params)
    rows = []
    for cell in a.cells:
        batch, context = (int(x) for x in cell.split("x"))
        for form, programs, attention in itertools.product(a.combine, a.split_programs,
                                                           a.attention):
            paged_decode.COMBINE_FORM = form
            paged_decode.SPLIT_PROGRAMS = programs
            jax.clear_caches()  # the jitted burst and kernels trace the combine again
            kv = batch * context * kv_bytes_per_token(full)
            floor = (wbytes + kv) / bw
            t0 = time.perf_counter()
            try:
                s_full = step_seconds(full, full_params, burst_args(full, batch, context,
                                      a.steps), a.steps, attention, a.reps)
                s_half = (step_seconds(half, half_params, burst_args(half, batch, context,
                          a.steps), a.steps, attention, a.reps) if a.half else float("nan"))
            except Exception as err:  # report and go on
                print(f"  {cell} {attention}: failed: {type(err).__name__}: {err}"[:300])
                continue
            per_layer = 2 * (s_full - s_half) / full.cfg.num_layers
            fixed = s_full - per_layer * full.cfg.num_layers
            row: dict[str, Any] = {
                "batch": batch, "context": context, "attention": label(attention),
                "combine": form, "split_programs": programs,
                "step_ms": 1e3 * s_full, "tokens_per_s": batch / s_full,
                "floor_ms": 1e3 * floor, "x_floor": s_full / floor,
                "half_depth_step_ms": 1e3 * s_half, "per_layer_us": 1e6 * per_layer,
                "fixed_ms": 1e3 * fixed}
            fused = backend(attention).get("fused")
            if fused is not None:
                row["fused_launch"] = fused.to_dict()
            if a.hlo_dir:
                write_hlo(Path(a.hlo_dir) / f"burst_{cell}_{label(attention)}_{form}_sp{programs}.txt", full,
                          full_params, burst_args(full, batch, context, a.steps), a.steps,
                          attention)
            if a.trace:
                row["trace"] = trace_summary(full, full_params, burst_args(
                    full, batch, context, a.steps), a.steps, attention)
            rows.append(row)
            print(f"  {batch:>3}x{context:<5} {label(attention):<7} {form:<8} sp{programs:<4} step "
                  f"{1e3 * s_full:6.3f} ms ({batch / s_full:8.0f} tok/s)  floor "
                  f"{1e3 * floor:5.3f} ms (x{s_full / floor:4.1f})  per layer {1e6 * per_layer:5.1f} us, fixed "
                  f"{1e3 * fixed:5.3f} ms  [{time.perf_counter() - t0:4.0f} s]", flush=True)
            if "trace" in row:
                tr = row["trace"]
                if "error" in tr:
                    print(f"    trace: {tr}")
                else:
                    print(f"    trace: {tr['kernels_per_step']:.0f} kernels/step, kernel time "
                          f"{tr['kernel_us_per_step']:.0f} us/step, span "
                          f"{tr['span_us_per_step']:.0f} us/step")
                    for t in tr["top"]:
                        print(f"      {t['us_per_step']:7.1f} us {t['calls_per_step']:5.1f}x "
                              f"{t['name']}")
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "scatter_writes": a.scatter_writes, "launch": a.launch,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "read_bandwidth": bw,
            "weight_bytes": wbytes, "steps": a.steps, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU check)")
    ap.add_argument("--cells", nargs="+", default=["8x512", "32x512", "8x2048"],
                    help="BATCHxCONTEXT")
    ap.add_argument("--attention", nargs="+", default=["triton", "xla"])
    ap.add_argument("--steps", type=int, default=8, help="decode forwards per burst")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-half", dest="half", action="store_false",
                    help="skip the half-depth model (no per-layer split)")
    ap.add_argument("--trace", action="store_true", help="profile one burst of each backend")
    ap.add_argument("--xla-flags", action="append", default=[],
                    help="also run in a child process with these XLA_FLAGS (repeatable; "
                    "write --xla-flags=--xla_...)")
    ap.add_argument("--scatter-writes", action="store_true",
                    help="triton decode steps write K/V by XLA scatters (no append kernel)")
    ap.add_argument("--launch", choices=("jax-triton", "xla"),
                    default=os.environ.get("KVJAX_TRITON_LAUNCH", "xla"),
                    help="how the Triton kernels launch (KVJAX_TRITON_LAUNCH; "
                         "pallas_kernels.triton_launch)")
    ap.add_argument("--split-programs", nargs="+", type=int,
                    default=[paged_decode.SPLIT_PROGRAMS],
                    help="the decode kernel's split rule: splits for about N programs")
    ap.add_argument("--combine", nargs="+", default=[paged_decode.COMBINE_FORM],
                    choices=paged_decode.COMBINE_FORMS,
                    help="how split partials are merged (paged_decode.combine_splits); "
                         "several: an A/B in this process")
    ap.add_argument("--hlo-dir", default=None,
                    help="write each burst's optimised HLO text here")
    ap.add_argument("--out", default=None, help="JSON results path")
    a = ap.parse_args()
    if min(a.split_programs) < 1:
        ap.error("--split-programs takes program counts of at least 1")
    if a.tiny and a.cells == ap.get_default("cells"):
        a.cells = ["2x40"]
    if a.tiny and a.attention == ap.get_default("attention"):
        a.attention = ["xla"]
    if not a.xla_flags:
        results = [run_grid(a)]
    else:  # every flag set, the environment's own first, in a process of its own: a
        # process holding the GPU's memory would leave the next one short of it
        results = []
        for flags in [os.environ.get("XLA_FLAGS", ""), *a.xla_flags]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                argv = [sys.executable, __file__, "--cells", *a.cells, "--attention",
                        *a.attention, "--combine", *a.combine, "--steps", str(a.steps),
                        "--split-programs", *map(str, a.split_programs),
                        "--reps", str(a.reps), "--out", f.name]
                argv += ["--tiny"] * a.tiny + ["--no-half"] * (not a.half)
                argv += ["--trace"] * a.trace + ["--scatter-writes"] * a.scatter_writes
                argv += ["--launch", a.launch]
                argv += ["--hlo-dir", a.hlo_dir] if a.hlo_dir and not flags.strip() else []
                print(f"--- XLA_FLAGS={flags!r}", flush=True)
                done = subprocess.run(argv, env={**os.environ, "XLA_FLAGS": flags},
                                      check=False)
                if done.returncode == 0:
                    results += json.loads(Path(f.name).read_text())
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
