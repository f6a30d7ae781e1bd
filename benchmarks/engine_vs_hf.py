"""The kvjax serving engine against Hugging Face ``generate``, same weights, one process.

A Qwen2.5-0.5B-shaped ``Qwen2ForCausalLM`` (24 layers, GQA 14:2, vocab 151936,
tied embeddings) is randomly initialised by transformers in bf16 and written with
``save_pretrained`` to a temporary directory; kvjax loads that directory with its
checkpoint loader (``kvjax.models.load_checkpoint``), so both sides run identical
weights. Greedy decoding, EOS ignored (every request makes exactly ``--new`` tokens).

Offline cells (batch x prompt, every request present at t = 0), each warmed up once
with the same shapes, then timed ``--repeats`` times (each metric its best over them):

* kvjax ``Engine`` (continuous batching, paged pool, chunked prefill; max batch = the
  largest batch, ``prefill_chunk`` = the prompt length, token budget ``--budget``,
  ``--decode-steps`` decode forwards per step once every request decodes, default 8):
  TTFT "all" = until every request has its first token, "mean" = mean over requests;
  decode tok/s = tokens sampled in the steps after the last first token / the time
  those steps took.
* kvjax ``generate(cache="paged")`` (one on-device loop; ``--with-generate``, off by
  default: it compiles two programs per cell): TTFT = a ``max_new_tokens=1`` call.
* HF ``generate`` with the dynamic cache and with ``cache_implementation="static"``.
  On CUDA transformers compiles the static cache's decode step with torch.compile by
  default; ``--hf-static-compile off`` disables it. The label says which ran.
  TTFT = a ``max_new_tokens=1`` call.

For ``generate`` (both libraries) decode tok/s = (new - 1) * batch / (total - TTFT).
Ratios: engine decode tok/s / HF static decode tok/s, and HF static TTFT / engine
TTFT (all): above 1 means the engine is faster. Greedy agreement of the engine with HF
(first token, and mean length of the common prefix) checks that the weights match;
bf16 rounding differs between the libraries, so late tokens may differ.

Online: ``kvjax serve-bench``-style replays (Poisson arrivals, lognormal prompts, 30%
sharing a prefix, prefix caching on) at each ``--rates`` value after precompiling
every step shape; reported: output tokens/s, TTFT and inter-token latency p50/p99,
and the best throughput whose p99 ITL meets ``--itl-target-ms``.

JAX and torch share the GPU: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` defaults to 0.5 here,
the HF phases run first and free their memory before JAX allocates anything.

GPU (H100, about 6-7 minutes): python benchmarks/engine_vs_hf.py --out engine_vs_hf.json
CPU smoke test (a tiny model, under 2 minutes): python benchmarks/engine_vs_hf.py --tiny
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # before jax is imported

import argparse
import dataclasses
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from engine_timing import BLOCK, bare_step_ms, offline_run, tok_rate
from transformers import Qwen2Config, Qwen2ForCausalLM

from kvjax.engine.engine import Engine
from kvjax.engine.generate import generate
from kvjax.engine.serve_bench import replay, summarize
from kvjax.engine.workload import LengthDist, WorkloadConfig, make_workload
from kvjax.models import LoadedModel, load_checkpoint
from kvjax.models.fused_decode import FusedLaunch
from pallas_kernels.triton_launch import triton_launcher


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model shape and the grid of one benchmark run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    batches: tuple[int, ...]
    prompts: tuple[int, ...]
    new: int  # tokens generated per request, offline
    budget: int  # engine max_tokens_per_step, offline
    rates: tuple[float, ...]  # online arrival rates, requests/s
    online_requests: int
    online_prompt: LengthDist
    online_output: LengthDist
    online_prefix: int  # shared prefix of 30% of the online requests
    online_chunk: int  # engine prefill_chunk and token budget, online


FULL = Setup(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936,
             max_positions=4096, batches=(1, 8, 32), prompts=(512, 2048), new=128, budget=8192,
             rates=(8.0, 16.0, 32.0), online_requests=96,
             online_prompt=LengthDist("lognormal", median=256.0, sigma=0.6, min=32, max=768),
             online_output=LengthDist("uniform", min=32, max=128), online_prefix=256,
             online_chunk=512)
TINY = Setup(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512,
             max_positions=512, batches=(1, 4), prompts=(32, 96), new=16, budget=256,
             rates=(20.0, 80.0), online_requests=24,
             online_prompt=LengthDist("lognormal", median=32.0, sigma=0.5, min=8, max=64),
             online_output=LengthDist("uniform", min=8, max=24), online_prefix=32,
             online_chunk=64)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def build_hf(s: Setup, device: str, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised bf16 Qwen2 (transformers' own init) on ``device``."""
    cfg = Qwen2Config(hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                      max_position_embeddings=s.max_positions, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return cast(Any, model).to(torch.bfloat16).eval()


def hf_cell(model: Qwen2ForCausalLM, prompts: np.ndarray, new: int, *, static: bool,
            compile_static: bool, repeats: int) -> dict[str, Any]:
    """HF greedy ``generate`` on a [B, P] batch: TTFT, total, decode tok/s, tokens."""
    ids = torch.as_tensor(prompts, device=model.device)
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                              pad_token_id=0)
    if static:
        kw.update(cache_implementation="static", disable_compile=not compile_static)
    first = dict(kw, max_new_tokens=1, min_new_tokens=1)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up: compiles the static decode step when enabled
        model.generate(ids, **first)
        ttft = min(_timed(lambda: model.generate(ids, **first))[0] for _ in range(repeats))
        runs = [_timed(lambda: model.generate(ids, **kw)) for _ in range(repeats)]
    total, out = min(runs, key=lambda r: r[0])
    b, p = prompts.shape
    assert out.shape == (b, p + new), out.shape
    return {"ttft_ms": ttft * 1e3, "total_s": total,
            "decode_tok_s": tok_rate((new - 1) * b, total - ttft),
            "tokens": out[:, p:].tolist()}


def engine_cell(engine: Engine, prompts: np.ndarray, new: int, repeats: int
                ) -> dict[str, Any]:
    """``offline_run``: warm-up once, then ``repeats`` runs, each metric its best over
    them, as for HF (``hf_cell``: the least TTFT, the least total): the run with the
    least total, its TTFT the least of any run and its decode figures those of the
    run with the shortest decode phase. ``decode_tok_s_runs`` lists every run's."""
    offline_run(engine, prompts, new)  # warm-up: compiles every shape this cell uses
    runs = [offline_run(engine, prompts, new) for _ in range(repeats)]
    best = dict(min(runs, key=lambda r: r["total_s"]))
    fastest = min(runs, key=lambda r: r["decode_s"])
    best.update({k: fastest[k] for k in ("decode_tokens", "decode_s", "decode_tok_s")})
    best.update(ttft_all_ms=min(r["ttft_all_ms"] for r in runs),
                ttft_mean_ms=min(r["ttft_mean_ms"] for r in runs),
                decode_tok_s_runs=[r["decode_tok_s"] for r in runs])
    return best


def generate_cell(lm: LoadedModel, prompts: np.ndarray, new: int, repeats: int
                  ) -> dict[str, Any]:
    """kvjax ``generate`` over the paged cache (one device loop per call)."""
    batch = [p.tolist() for p in prompts]

    def call(n: int) -> Callable[[], Any]:
        return lambda: generate(lm.model, lm.params, batch, max_new_tokens=n, cache="paged",
                                block_size=BLOCK)

    call(1)()
    call(new)()
    ttft = min(_timed(call(1))[0] for _ in range(repeats))
    total = min(_timed(call(new))[0] for _ in range(repeats))
    return {"ttft_ms": ttft * 1e3, "total_s": total,
            "decode_tok_s": tok_rate((new - 1) * len(batch), total - ttft)}


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn(*args, **kwargs)``, or ``{"error": ...}`` when it raises (out of memory,
    compile failure)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def variant_row(steps: int, overlap: bool, fused: bool) -> str:
    """The record key of an engine variant after the first (``row["engine"]``)."""
    return f"engine_steps{steps}" + ("_overlap" if overlap else "") + ("_fused" if fused else "")


def bare_burst_rows(lm: LoadedModel, engines: list[Engine],
                    variants: list[tuple[int, bool, bool]], row: dict[str, Any], batch: int,
                    prompt: int, new: int) -> dict[str, float]:
    """The decode burst of each burst variant alone, queued back to back in this process
    (``bare_step_ms``: ``batch`` rows at the decode phase's middle position, tables as
    wide as the engine makes them): ms per token step, keyed ``steps{N}[_fused]``. Each
    engine row of the variant gets ``engine_vs_bare``, its own ms per step over that."""
    bare: dict[str, float] = {}
    engine_rows = ["engine"] + [variant_row(*v) for v in variants[1:]]
    for (steps, _, fused), engine, name in zip(variants, engines, engine_rows, strict=True):
        key = f"steps{steps}" + ("_fused" if fused else "")
        if steps == 1:
            continue
        if key not in bare:
            width = engine._table_width(-(-(prompt + new) // BLOCK))
            bare[key] = bare_step_ms(lm.model, lm.params, batch, prompt + new // 2, steps,
                                     width, engine.attention, 5, fused=engine.fused_launch)
        r = row[name]
        r["engine_vs_bare"] = r["decode_s"] / (r["decode_tokens"] / batch) * 1e3 / bare[key]
        print(f"  {name:<10} batch {batch:>3} prompt {prompt:>5}: bare burst "
              f"{bare[key]:.3f} ms/step, engine x{r['engine_vs_bare']:.3f}", flush=True)
    return bare


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Share of rows whose first token agrees, and the mean common-prefix length."""
    common = [next((i for i, (x, y) in enumerate(zip(r, s, strict=True)) if x != y), len(r))
              for r, s in zip(a, b, strict=True)]
    return {"first_token": float(np.mean([c > 0 for c in common])),
            "common_prefix_tokens": float(np.mean(common))}


def online(lm: LoadedModel, s: Setup, max_batch: int, itl_target_ms: float
           ) -> dict[str, Any]:
    """Replay the online workload at each rate through a fresh engine."""
    rows = []
    precompiled = 0
    for rate in s.rates:
        wl = WorkloadConfig(num_requests=s.online_requests, arrival_rate=rate,
                            prompt_len=s.online_prompt, output_len=s.online_output,
                            shared_prefix_fraction=0.3, shared_prefix_len=s.online_prefix,
                            seed=1)
        need = -(-wl.max_request_tokens // BLOCK)
        engine = Engine(lm.model, lm.params, num_blocks=max_batch * need + need,
                        block_size=BLOCK, max_batch=max_batch, prefill_chunk=s.online_chunk,
                        max_tokens_per_step=s.online_chunk, prefix_caching=True)
        precompiled = engine.precompile(wl.max_request_tokens)
        items = make_workload(wl, lm.config.vocab_size)
        summary = summarize(engine, items, replay(engine, items, progress=False))
        row = {"rate": rate, **{k: summary[k] for k in (
            "output_tokens_per_s", "total_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "batch_occupancy", "preemptions", "prefix_hit_rate",
            "duration_s")}}
        row["meets_target"] = row["itl_p99_ms"] <= itl_target_ms
        rows.append(row)
        print(f"  online {rate:6.1f} req/s: {row['output_tokens_per_s']:9.1f} tok/s, TTFT p99 "
              f"{row['ttft_p99_ms']:7.1f} ms, ITL p50/p99 {row['itl_p50_ms']:6.2f}/"
              f"{row['itl_p99_ms']:6.2f} ms, occupancy {row['batch_occupancy']:.0%}",
              flush=True)
        del engine
    ok = [r for r in rows if r["meets_target"]]
    best = max(ok, key=lambda r: r["output_tokens_per_s"]) if ok else None
    return {"itl_target_ms": itl_target_ms, "max_batch": max_batch,
            "prefill_chunk": s.online_chunk, "max_tokens_per_step": s.online_chunk,
            "step_shapes": precompiled, "rows": rows,
            "best_at_target": best}


def _fmt(r: dict[str, Any] | None, ttft_key: str = "ttft_ms") -> str:
    if r is None:
        return f"{'-':>22}"
    if "error" in r:
        return f"{'skipped' if r['error'] == 'skipped' else 'error':>22}"
    return f"{r['decode_tok_s']:9.0f} ({r[ttft_key]:7.1f} ms)"


def print_table(rows: list[dict[str, Any]], static_label: str) -> None:
    print(f"\ndecode tok/s (TTFT). engine TTFT = every request's first token; ratios vs HF "
          f"{static_label}: decode = engine / HF, TTFT = HF / engine")
    print(f"{'batch':>5} {'prompt':>6} | {'kvjax engine':>22} | {'kvjax generate':>22} | "
          f"{'HF dynamic':>22} | {'HF ' + static_label:>22} | {'decode x':>8} {'TTFT x':>7}")
    for r in rows:
        eng, st = r["engine"], r["hf_static"]
        print(f"{r['batch']:>5} {r['prompt']:>6} | {_fmt(eng, 'ttft_all_ms')} | "
              f"{_fmt(r.get('generate'))} | {_fmt(r['hf_dynamic'])} | {_fmt(st)} | "
              f"{r['decode_ratio_vs_hf_static']:8.2f} {r['ttft_ratio_vs_hf_static']:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and grid (CPU check)")
    ap.add_argument("--out", default=None, help="JSON results path (default: print only)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per cell, each metric's best kept (decode rates of "
                         "single runs varied by up to 19%% on an H100)")
    ap.add_argument("--bare-burst", action=argparse.BooleanOptionalAction, default=True,
                    help="also time each burst variant's decode burst alone, queued back "
                         "to back in this process (the engine's own ceiling)")
    ap.add_argument("--new", type=int, default=None,
                    help="tokens per request, offline (default 128 on the full model, as "
                         "in the reference HF table; the runs before 2026-12-07 used 64)")
    ap.add_argument("--budget", type=int, default=None,
                    help="engine token budget per step, offline (default 8192; tiny 256)")
    ap.add_argument("--with-generate", action="store_true",
                    help="also time kvjax generate(cache='paged') (two compiles per cell)")
    ap.add_argument("--hf-static-compile", choices=("auto", "off"), default="auto",
                    help="auto: transformers' default (torch.compile on CUDA); off: eager")
    ap.add_argument("--itl-target-ms", type=float, default=None,
                    help="online p99 inter-token latency target (default 50; tiny 200)")
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--jax-cache", default="runs/jax_cache",
                    help="persistent XLA compilation cache ('' = none): a rerun skips compiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[8],
                    help="offline engine: decode forwards per step once every request is "
                         "decoding (Engine(decode_steps=...); the online replay uses 1); "
                         "several values: one engine row each, the first is 'engine'")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="offline batch sizes (default 1 8 32; tiny 1 4)")
    ap.add_argument("--prompts", type=int, nargs="+", default=None,
                    help="offline prompt lengths (default 512 2048; tiny 32 96)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="offline engine max_batch (default: the largest batch)")
    ap.add_argument("--overlap-bursts", action="store_true",
                    help="also an engine row per --decode-steps value with overlap_bursts "
                         "(the next burst dispatched before the last one is read)")
    ap.add_argument("--fused-decode", action="store_true",
                    help="also each engine row with fused_decode (decode bursts through the "
                         "fused Triton layer kernels; GPU)")
    ap.add_argument("--fused-launch", default=None,
                    help="with --fused-decode: the FusedLaunch JSON the fused rows use "
                         "(fused_layer_kernels.py --launch-out); default: FusedLaunch()")
    ap.add_argument("--skip-hf-dynamic", action="store_true",
                    help="time HF generate with the static cache only")
    args = ap.parse_args()
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
    s = TINY if args.tiny else FULL
    if args.budget is not None:
        s = dataclasses.replace(s, budget=args.budget)
    if args.new is not None:
        if args.new < 2:
            ap.error("--new must be >= 2 (a first token and at least one decode step)")
        s = dataclasses.replace(s, new=args.new)
    if args.batches:
        s = dataclasses.replace(s, batches=tuple(args.batches))
    if args.prompts:
        s = dataclasses.replace(s, prompts=tuple(args.prompts))
    target = args.itl_target_ms or (200.0 if args.tiny else 50.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = args.hf_static_compile == "auto" and device == "cuda"
    static_label = "static (compiled)" if compiled else "static (eager)"
    fused_launch = (FusedLaunch.from_json(args.fused_launch) if args.fused_launch
                    else FusedLaunch())
    record: dict[str, Any] = {
        "setup": dataclasses.asdict(s), "torch_device": device,
        "jax_backend": jax.default_backend(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "hf_static": static_label, "weights": "random (transformers init), bf16, identical "
        "on both sides via save_pretrained -> kvjax load_checkpoint",
        "engine_decode_steps": args.decode_steps, "triton_launch": triton_launcher(),
        "fused_launch": fused_launch.to_dict() if args.fused_decode else None,
        "offline": [], "phase_s": {}}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")

    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    grid = [(b, p) for p in s.prompts for b in s.batches]
    prompts = {(b, p): rng.integers(0, s.vocab, (b, p)) for b, p in grid}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        hf = build_hf(s, device, args.seed)
        hf.save_pretrained(tmp)
        record["phase_s"]["build_and_save"] = time.perf_counter() - t
        hf_rows: dict[tuple[int, int], dict[str, Any]] = {}
        for name, static in (("hf_dynamic", False), ("hf_static", True)):
            t = time.perf_counter()
            if name == "hf_dynamic" and args.skip_hf_dynamic:
                for b, p in grid:
                    hf_rows.setdefault((b, p), {})[name] = {"error": "skipped"}
                continue
            for b, p in grid:
                hf_rows.setdefault((b, p), {})[name] = r = _guarded(
                    hf_cell, hf, prompts[b, p], s.new, static=static, compile_static=compiled,
                    repeats=args.repeats)
                print(f"  {name:<10} batch {b:>3} prompt {p:>5}: {_fmt(r)}", flush=True)
            record["phase_s"][name] = time.perf_counter() - t
        del hf
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        lm = load_checkpoint(tmp, dtype=jnp.bfloat16)
        record["phase_s"]["kvjax_load"] = time.perf_counter() - t

    t = time.perf_counter()
    max_batch = args.max_batch or max(s.batches)
    record["engine_max_batch"] = max_batch
    for p in s.prompts:
        need = -(-(p + s.new) // BLOCK)
        variants = [(steps, False, False) for steps in args.decode_steps] + [
            (steps, True, False) for steps in args.decode_steps if args.overlap_bursts]
        variants += [(steps, overlap, True) for steps, overlap, _ in variants
                     if args.fused_decode]
        engines = [Engine(lm.model, lm.params, num_blocks=max_batch * need + need,
                          block_size=BLOCK, max_batch=max_batch, prefill_chunk=p,
                          max_tokens_per_step=max(s.budget, p), decode_steps=steps,
                          overlap_bursts=overlap, fused_decode=fused,
                          fused_launch=fused_launch if fused else None)
                   for steps, overlap, fused in variants]
        engine = engines[0]
        for b in s.batches:
            row: dict[str, Any] = {"batch": b, "prompt": p, "new": s.new, **hf_rows[b, p]}
            row["engine"] = engine_cell(engine, prompts[b, p], s.new, args.repeats)
            for (steps, overlap, fused), other in zip(variants[1:], engines[1:], strict=True):
                name = variant_row(steps, overlap, fused)
                r = row[name] = engine_cell(other, prompts[b, p], s.new, args.repeats)
                r.pop("tokens", None)
                ok_st = "error" not in row["hf_static"]
                ratio = (r["decode_tok_s"] / row["hf_static"]["decode_tok_s"] if ok_st
                         else float("nan"))
                r["decode_ratio_vs_hf_static"] = ratio
                print(f"  {name:<10} batch {b:>3} prompt {p:>5}: "
                      f"{_fmt(r, 'ttft_all_ms')}; x{ratio:.2f} decode vs HF", flush=True)
            if args.bare_burst:
                row["bare_burst_ms"] = bare_burst_rows(lm, engines, variants, row, b, p,
                                                       s.new)
            if args.with_generate:  # e.g. out of memory at batch 32 x 2048: reported
                row["generate"] = _guarded(generate_cell, lm, prompts[b, p], s.new,
                                           args.repeats)
            eng, st, dyn = row["engine"], row["hf_static"], row["hf_dynamic"]
            ok = "error" not in st
            row["decode_ratio_vs_hf_static"] = (
                eng["decode_tok_s"] / st["decode_tok_s"] if ok else float("nan"))
            row["ttft_ratio_vs_hf_static"] = (
                st["ttft_ms"] / eng["ttft_all_ms"] if ok else float("nan"))
            if "error" not in dyn:
                row["agreement_vs_hf_dynamic"] = agreement(eng["tokens"], dyn["tokens"])
            for r in (eng, st, dyn):
                r.pop("tokens", None)
            record["offline"].append(row)
            agree = row.get("agreement_vs_hf_dynamic", {}).get("first_token", float("nan"))
            print(f"  engine     batch {b:>3} prompt {p:>5}: {_fmt(eng, 'ttft_all_ms')} "
                  f"(TTFT mean {eng['ttft_mean_ms']:.1f} ms); "
                  f"x{row['decode_ratio_vs_hf_static']:.2f} decode vs HF {static_label}; "
                  f"first tokens equal to HF: {agree:.0%}", flush=True)
            save()
        del engine, engines
    record["phase_s"]["kvjax_offline"] = time.perf_counter() - t
    print_table(record["offline"], static_label)
    if not args.skip_online:
        t = time.perf_counter()
        print(f"\nonline: {s.online_requests} requests per rate, p99 ITL target {target} ms")
        record["online"] = online(lm, s, max_batch, target)
        record["phase_s"]["kvjax_online"] = time.perf_counter() - t
        best = record["online"]["best_at_target"]
        print("best at target: " + (f"{best['output_tokens_per_s']:.1f} output tok/s at "
                                    f"{best['rate']} req/s" if best else "no rate met it"))
    record["phase_s"]["total"] = time.perf_counter() - t_start
    save()
    print(f"\ntotal {record['phase_s']['total']:.0f} s" + (f"; JSON in {args.out}"
                                                           if args.out else ""))


if __name__ == "__main__":
    main()
