"""``kvjax serve-bench``: replay a synthetic workload through the engine in wall-clock time.

The model has random weights (a preset's shape or the tiny built-in one). Requests
are drawn up front (``kvjax.engine.workload``) and added to the engine when their
arrival time passes, with that time as their arrival (so a request that arrives
during a step is not credited with the wait); the engine steps while anything is
unfinished and sleeps until the next arrival otherwise. Before the replay every step
shape the workload can use is compiled (``Engine.precompile``), so compilation does
not land in the latencies; the number of programs compiled during the replay anyway
is reported.

Reported (stdout table, ``results.json``): throughput in output and total tokens/s
over the replay's wall time (first arrival to last retirement), TTFT, inter-token
latency (every gap between consecutive tokens of a request, pooled) and end-to-end
latency percentiles, time-weighted batch occupancy, preemptions and prefix-cache
hits. ``requests.csv`` has one row per request, ``steps.csv`` one per engine step.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvjax.engine.engine import Engine, compiled_programs
from kvjax.engine.serve_config import (
    DTYPES,
    ServeBenchConfig,
    ServeBenchConfigError,
    check_fits,
    load_config,
)
from kvjax.engine.workload import WorkItem, make_workload
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from kvjax.runner import ExperimentConfigError, parse_overrides

EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class Replay:
    """What a replay did: request ids in workload order and its wall-clock span."""

    rids: list[int]
    start: float  # time.perf_counter() at the first arrival
    end: float  # after the last request retired

    @property
    def duration_s(self) -> float:
        return self.end - self.start


def build_engine(cfg: ServeBenchConfig) -> Engine:
    """The configured engine over a random-weight model (weights drawn on the host)."""
    model_cfg = check_fits(cfg)
    dtype = DTYPES[cfg.model.dtype]
    model = Decoder(model_cfg, dtype=dtype)
    params = random_params(model_cfg, dtype, cfg.model.seed, cfg.model.init_scale)
    e = cfg.engine
    return Engine(model, params, num_blocks=e.num_blocks, block_size=e.block_size,
                  max_batch=e.max_batch, prefill_chunk=e.prefill_chunk,
                  max_tokens_per_step=e.max_tokens_per_step or None,
                  prefix_caching=e.prefix_caching, attention=e.attention,
                  decode_steps=e.decode_steps, preemption=e.preemption,
                  swap_blocks=e.swap_blocks, host_staging=e.host_staging,
                  overlap_bursts=e.overlap_bursts, fused_decode=e.fused_decode,
                  fused_launch=e.fused_launch if e.fused_decode else None)


def replay(engine: Engine, items: list[WorkItem], *, progress: bool = True) -> Replay:
    """Add each item when its arrival time passes, step until every request retired."""
    rids: list[int] = []
    start = time.perf_counter()
    done = 0
    with tqdm(total=len(items), unit="req", desc="serve-bench", disable=not progress,
              file=sys.stderr) as bar:
        while len(rids) < len(items) or engine.has_unfinished():
            now = time.perf_counter() - start
            while len(rids) < len(items) and items[len(rids)].arrival_s <= now:
                item = items[len(rids)]
                rids.append(engine.add_request(item.prompt, max_new_tokens=item.max_new_tokens,
                                               arrival_time=start + item.arrival_s))
            if engine.has_unfinished():
                engine.step()
            elif len(rids) < len(items):
                time.sleep(max(0.0, items[len(rids)].arrival_s - now))
            bar.update(len(engine.finished) - done)
            done = len(engine.finished)
    return Replay(rids, start, time.perf_counter())


def _ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else 0.0


def summarize(engine: Engine, items: list[WorkItem], run: Replay) -> dict[str, Any]:
    """Throughput and latency figures of a finished replay (times in ms, rates per s)."""
    reqs = [engine.request_metrics[r] for r in run.rids]
    steps = engine.step_metrics
    ttft = [r.ttft_s for r in reqs if r.ttft_s is not None]
    itl = [x for r in reqs for x in r.itl_s]
    e2e = [r.e2e_s for r in reqs]
    out_tokens = sum(r.output_tokens for r in reqs)
    prompt_tokens = sum(r.prompt_tokens for r in reqs)
    busy = sum(s.duration_s for s in steps)
    dur = run.duration_s
    m = engine.metrics()
    return {
        "requests": len(reqs),
        "shared_prefix_requests": sum(it.shared_prefix for it in items),
        "duration_s": dur,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / dur,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / dur,
        "requests_per_s": len(reqs) / dur,
        "ttft_mean_ms": float(np.mean(ttft) * 1e3) if ttft else 0.0,
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "itl_mean_ms": float(np.mean(itl) * 1e3) if itl else 0.0,
        "itl_p50_ms": _ms(itl, 50),
        "itl_p99_ms": _ms(itl, 99),
        "e2e_p50_ms": _ms(e2e, 50),
        "e2e_p99_ms": _ms(e2e, 99),
        # Rows in use, weighted by how long each step took.
        "batch_occupancy": (sum(s.occupancy * s.duration_s for s in steps) / busy
                            if busy > 0 else 0.0),
        "busy_fraction": busy / dur,
        "steps": len(steps),
        "preemptions": m.preemptions,
        "swapped_out_blocks": m.swapped_out_blocks,
        "swapped_in_blocks": m.swapped_in_blocks,
        "swap_gbps_to_host": m.swap_gbps_to_host,
        "swap_gbps_to_device": m.swap_gbps_to_device,
        "prefix_hit_tokens": m.prefix_hit_tokens,
        "prefix_hit_rate": m.prefix_hit_rate,
        "cached_tokens": sum(r.cached_tokens for r in reqs),
        "finish_reasons": {k: sum(r.finish_reason == k for r in reqs)
                           for k in sorted({r.finish_reason for r in reqs})},
    }


def _write_csvs(out: Path, engine: Engine, items: list[WorkItem], run: Replay) -> None:
    with (out / "requests.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request", "arrival_s", "shared_prefix", "prompt_tokens", "output_tokens",
                    "cached_tokens", "preemptions", "ttft_ms", "itl_mean_ms", "itl_p50_ms",
                    "itl_p99_ms", "e2e_ms", "finish_reason"])
        for rid, item in zip(run.rids, items, strict=True):
            r = engine.request_metrics[rid]
            w.writerow([rid, f"{item.arrival_s:.6f}", int(item.shared_prefix), r.prompt_tokens,
                        r.output_tokens, r.cached_tokens, r.preemptions,
                        "" if r.ttft_s is None else f"{r.ttft_s * 1e3:.3f}",
                        f"{np.mean(r.itl_s) * 1e3:.3f}" if r.itl_s else "",
                        f"{r.itl_p50_s * 1e3:.3f}", f"{r.itl_p99_s * 1e3:.3f}",
                        f"{r.e2e_s * 1e3:.3f}", r.finish_reason])
    with (out / "steps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "start_s", "duration_ms", "rows", "waiting", "admitted",
                    "prefill_tokens", "decode_tokens", "cached_tokens", "new_tokens",
                    "preempted", "decode_steps", "shapes"])
        for i, s in enumerate(engine.step_metrics):
            w.writerow([i, f"{s.start - run.start:.6f}", f"{s.duration_s * 1e3:.3f}", s.rows,
                        s.waiting, s.admitted, s.prefill_tokens, s.decode_tokens,
                        s.cached_tokens, s.new_tokens, s.preempted, s.decode_steps,
                        " ".join("x".join(map(str, shape)) for shape in s.shapes)])


def run(cfg: ServeBenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Build, precompile, replay, write ``results.json``, ``requests.csv`` and
    ``steps.csv`` into ``cfg.output_dir``; return the results record."""
    from kvjax.runner import environment

    engine = build_engine(cfg)
    items = make_workload(cfg.workload, engine.model.cfg.vocab_size)
    t0 = time.perf_counter()
    shapes = engine.precompile(cfg.workload.max_request_tokens) if cfg.precompile else 0
    precompile_s = time.perf_counter() - t0
    compiled = compiled_programs()
    run_ = replay(engine, items, progress=progress)
    summary = summarize(engine, items, run_)
    summary["compiled_during_run"] = compiled_programs() - compiled
    target = cfg.p99_itl_target_ms
    if target > 0:
        summary["p99_itl_target_ms"] = target
        summary["meets_p99_itl_target"] = summary["itl_p99_ms"] <= target
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": dataclasses.asdict(cfg), "environment": environment(),
              "model": dataclasses.asdict(engine.model.cfg),
              "precompile": {"shapes": shapes, "seconds": precompile_s},
              "summary": summary}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    _write_csvs(out, engine, items, run_)
    return record


_ROWS = (
    ("requests", "requests", "{:.0f}"), ("duration", "duration_s", "{:.2f} s"),
    ("output throughput", "output_tokens_per_s", "{:.1f} tok/s"),
    ("total throughput", "total_tokens_per_s", "{:.1f} tok/s"),
    ("request throughput", "requests_per_s", "{:.2f} req/s"),
    ("TTFT mean", "ttft_mean_ms", "{:.1f} ms"), ("TTFT p50", "ttft_p50_ms", "{:.1f} ms"),
    ("TTFT p99", "ttft_p99_ms", "{:.1f} ms"), ("ITL p50", "itl_p50_ms", "{:.2f} ms"),
    ("ITL p99", "itl_p99_ms", "{:.2f} ms"), ("E2E p50", "e2e_p50_ms", "{:.1f} ms"),
    ("E2E p99", "e2e_p99_ms", "{:.1f} ms"),
    ("batch occupancy", "batch_occupancy", "{:.1%}"), ("busy", "busy_fraction", "{:.1%}"),
    ("steps", "steps", "{:.0f}"), ("preemptions", "preemptions", "{:.0f}"),
    ("prefix hit rate", "prefix_hit_rate", "{:.1%}"),
    ("compiled during run", "compiled_during_run", "{:.0f}"),
)


def format_table(record: dict[str, Any]) -> str:
    """The metrics table printed by ``kvjax serve-bench``."""
    s = record["summary"]
    env = record["environment"]
    model = record["config"]["model"]
    lines = [f"serve-bench: {model['preset']} ({model['dtype']}) on "
             f"{env['devices'][0] if env['devices'] else env['backend']}"]
    lines += [f"  {label:<22}{fmt.format(s[key]):>16}" for label, key, fmt in _ROWS]
    if "p99_itl_target_ms" in s:
        verdict = "met" if s["meets_p99_itl_target"] else "missed"
        lines.append(f"  {'p99 ITL target':<22}{s['p99_itl_target_ms']:>13.1f} ms {verdict}")
    return "\n".join(lines)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-bench`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve-bench", help="replay a serving workload through the engine; report latency "
                            "and throughput")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/serve-bench.yaml")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one entry of the config (value read as YAML), e.g. "
                        "engine.preemption=swap; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``serve-bench``: a config error is one line and exit status 2."""
    try:
        cfg = load_config(args.config, args.output_dir, parse_overrides(args.set))
    except (ServeBenchConfigError, ExperimentConfigError) as err:
        print(f"kvjax serve-bench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    record = run(cfg, progress=not args.no_progress)
    print(format_table(record))
    print(f"results in {cfg.output_dir} (results.json, requests.csv, steps.csv)")
    return 0
