"""prefix-sharing: what a radix prefix cache saves on shared prompts, by pool size.

A decoder of a real architecture with random weights generates greedily through
``kvjax.engine.prefix_generate.PrefixCachedGenerator`` over a paged KV pool of each
size in ``pool_blocks``, with the prefix cache on and off (off = the same generator
and pool with lookups and commits disabled: every prompt prefilled in full). Three
workloads, their token ids random but fixed by the seed:

* ``system-prompt``: ``num_requests`` requests, one shared system prompt + a unique
  question each;
* ``few-shot``: ``num_tasks`` task templates of ``shots`` examples each, requests
  cycling through the tasks, each template + a unique query (the templates compete
  for the pool);
* ``multi-turn``: ``num_conversations`` chats sharing a system prompt; turn ``t + 1``
  of a chat is its turn-``t`` prompt + the model's answer + a new user message. One
  call per turn carries every chat's next message.

System-prompt and few-shot requests arrive ``requests_per_call`` per ``generate`` call.
For each (workload, pool, cache on/off) the whole workload runs ``1 + repeats`` times,
each on a fresh generator (empty pool and cache): a warm-up run that compiles every
shape, then ``repeats`` measured runs; a request's TTFT is its median. The pool's paged
attention is ``attention`` ("xla" by default, the gather reference; "auto" = the
Triton/Pallas kernels on a GPU). All pool sizes share one device page array of
``max(pool_blocks)`` pages, of which the allocator manages ``pool`` (``device_blocks``):
compiled steps are shared across pool sizes, and a step's cost does not depend on the
unused pages. TTFT is the generator's: wall time from the call's start until the
request's first-token logits are ready on device (``jax.block_until_ready`` after its
prefill step), so it includes the host-side lookup and, within a call, earlier prefill
waves and, where the pool cannot hold a call's requests together (multi-turn, small
pools), the earlier groups' decoding. Every output is compared with plain dense
generation (``generate(..., cache="dense")``) of the same prompts; in bfloat16 a
different summation order may flip a near tie, so identity is reported, not assumed.

Each finished setting is saved in ``out_dir/finished`` (:class:`kvjax.resume.FinishedParts`)
and reused by a later run with the same parameters (the workloads and pools may differ):
a run cut off by a time limit resumes where it stopped, and a sweep can be split by pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax.analysis.presets import get_preset
from kvjax.analysis.spec import ArchSpec
from kvjax.cache.paged import ATTENTION_BACKENDS
from kvjax.engine.generate import generate
from kvjax.engine.prefix_generate import PrefixCachedGenerator, PrefixGenerationStats
from kvjax.models.llama import Decoder
from kvjax.models.random_init import random_params
from kvjax.resume import FinishedParts
from kvjax.runner import write_csv

WORKLOADS = ("system-prompt", "few-shot", "multi-turn")
MODES = ("cache", "no-cache")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Call = list[list[int]]


@dataclasses.dataclass(frozen=True)
class Params:
    """Model, pool sizes and workloads of the prefix-sharing experiment."""

    model: str = "qwen2.5-0.5b"  # preset naming the architecture (random weights)
    num_layers: int = 0  # override the preset's depth (0 = the preset's)
    vocab_size: int = 0  # override the vocabulary (0 = the preset's); smaller for CPU
    dtype: str = "float32"  # weights and KV pool: float32 or bfloat16
    block_size: int = 16  # tokens per KV block (page)
    pool_blocks: tuple[int, ...] = (48, 96, 192)  # pool sizes to compare, in blocks
    workloads: tuple[str, ...] = WORKLOADS
    max_new_tokens: int = 16  # greedy tokens per request (no stop tokens)
    requests_per_call: int = 1  # system-prompt / few-shot requests per generate call
    repeats: int = 3  # measured runs per setting (after one warm-up); median TTFT
    num_requests: int = 8  # system-prompt and few-shot requests
    system_len: int = 512  # shared system prompt (system-prompt and multi-turn)
    question_len: int = 32  # unique part of a system-prompt request
    num_tasks: int = 2  # few-shot templates, requests cycle through them
    shots: int = 4  # examples per template
    shot_len: int = 96  # tokens per example
    query_len: int = 32  # unique part of a few-shot request
    num_conversations: int = 2  # multi-turn chats
    num_turns: int = 4  # turns per chat
    user_len: int = 48  # tokens per user message
    seed: int = 0  # weights and token ids
    attention: str = "xla"  # the pool's paged attention backend ("auto": kernels on GPU)

    def __post_init__(self) -> None:
        if self.attention not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(f"attention must be 'auto' or one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad = sorted(set(self.workloads) - set(WORKLOADS))
        if bad or not self.workloads:
            raise ValueError(f"unknown workloads {bad}; known: {list(WORKLOADS)}")
        counts = {k: getattr(self, k) for k in (
            "block_size", "max_new_tokens", "requests_per_call", "repeats", "num_requests",
            "system_len",
            "question_len", "num_tasks", "shots", "shot_len", "query_len",
            "num_conversations", "num_turns", "user_len")}
        small = [k for k, v in counts.items() if v < 1]
        if small or self.num_layers < 0 or self.vocab_size < 0:
            raise ValueError(f"parameters must be positive: {small or 'num_layers/vocab_size'}")
        if not self.pool_blocks:
            raise ValueError("pool_blocks must not be empty")
        need = max(-(-request_tokens(self, w) // self.block_size) for w in self.workloads)
        if min(self.pool_blocks) < need:
            raise ValueError(f"pool_blocks {min(self.pool_blocks)} cannot hold the largest "
                             f"request: {need} blocks of {self.block_size} tokens")


def request_tokens(p: Params, workload: str) -> int:
    """Prompt + new tokens of the workload's longest request (outputs never stop early)."""
    if workload == "system-prompt":
        return p.system_len + p.question_len + p.max_new_tokens
    if workload == "few-shot":
        return p.shots * p.shot_len + p.query_len + p.max_new_tokens
    return p.system_len + p.num_turns * (p.user_len + p.max_new_tokens)


def workload_calls(p: Params, workload: str, vocab: int
                   ) -> Generator[Call, list[list[int]], None]:
    """Yield the workload's calls (lists of prompts); send each call's outputs back.

    The token ids depend only on the parameters, not on the outputs sent back.
    """
    rng = np.random.default_rng([p.seed, WORKLOADS.index(workload)])

    def tokens(n: int) -> list[int]:
        return rng.integers(0, vocab, n).tolist()

    if workload == "multi-turn":
        system = tokens(p.system_len)
        chats = [system + tokens(p.user_len) for _ in range(p.num_conversations)]
        for turn in range(p.num_turns):
            outputs = yield chats
            if turn + 1 < p.num_turns:
                chats = [c + o + tokens(p.user_len) for c, o in zip(chats, outputs, strict=True)]
        return
    if workload == "system-prompt":
        system = tokens(p.system_len)
        requests = [system + tokens(p.question_len) for _ in range(p.num_requests)]
    else:
        templates = [tokens(p.shots * p.shot_len) for _ in range(p.num_tasks)]
        requests = [templates[i % p.num_tasks] + tokens(p.query_len)
                    for i in range(p.num_requests)]
    for i in range(0, len(requests), p.requests_per_call):
        yield requests[i : i + p.requests_per_call]


Runner = Callable[[Call], tuple[list[list[int]], PrefixGenerationStats | None]]


def drive(p: Params, workload: str, vocab: int, fn: Runner
          ) -> tuple[list[list[int]], list[list[int]], list[PrefixGenerationStats]]:
    """Run the workload through ``fn``: (prompts, outputs, per-call stats)."""
    calls = workload_calls(p, workload, vocab)
    prompts: list[list[int]] = []
    outputs: list[list[int]] = []
    stats: list[PrefixGenerationStats] = []
    call = next(calls)
    while True:
        out, st = fn(call)
        prompts += call
        outputs += out
        if st is not None:
            stats.append(st)
        try:
            call = calls.send(out)
        except StopIteration:
            return prompts, outputs, stats


def _summary(workload: str, pool: int, mode: str, runs: list[list[PrefixGenerationStats]],
             identical: list[bool]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One CSV row and the per-request rows of a setting; times are medians over runs."""
    reqs = [r for st in runs[0] for r in st.requests]  # the cache's work is deterministic
    ttft_runs = np.asarray([[r.ttft_s for st in run for r in st.requests] for run in runs])
    prefill_runs = np.asarray([[r.prefill_s for st in run for r in st.requests]
                               for run in runs])
    ttft, prefill = np.median(ttft_runs, axis=0), np.median(prefill_runs, axis=0)
    prompt = sum(r.prompt_tokens for r in reqs)
    hit = sum(r.hit_tokens for r in reqs)
    saved = sum(r.prefill_tokens_saved for r in reqs)
    stats = runs[0]
    row = {"workload": workload, "pool_blocks": pool, "mode": mode, "requests": len(reqs),
           "calls": len(stats), "prompt_tokens": prompt, "hit_tokens": hit,
           "hit_rate": hit / prompt, "prefill_tokens_computed": prompt - saved,
           "prefill_tokens_saved": saved, "saved_fraction": saved / prompt,
           "evicted_blocks": sum(st.evicted_blocks for st in stats),
           "waves": sum(st.waves for st in stats), "groups": sum(st.groups for st in stats),
           "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.median(ttft)),
           "ttft_max_s": float(ttft.max()),
           "total_s": float(np.median([sum(st.total_s for st in run) for run in runs])),
           "identical_requests": int(sum(identical)), "tokens_identical": all(identical)}
    per_request = [{"workload": workload, "pool_blocks": pool, "mode": mode, "request": i,
                    "prompt_tokens": r.prompt_tokens, "hit_tokens": r.hit_tokens,
                    "prefill_tokens_saved": r.prefill_tokens_saved,
                    "prefill_tokens_computed": r.prefill_tokens_computed, "wave": r.wave,
                    "ttft_s": float(t), "prefill_s": float(pf), "identical": same}
                   for i, (r, t, pf, same) in enumerate(zip(reqs, ttft, prefill, identical,
                                                            strict=True))]
    return row, per_request


def build_model(preset: str, num_layers: int, vocab_size: int, dtype: str, seed: int
                ) -> tuple[ArchSpec, Decoder, Any]:
    """The preset's architecture (0 keeps its depth / vocabulary) with random weights."""
    spec = get_preset(preset)
    cfg = spec.to_model_config(num_layers=num_layers or None)
    if vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    model = Decoder(cfg, dtype=DTYPES[dtype])
    return spec, model, random_params(cfg, DTYPES[dtype], seed)


def finished_parts(p: Params, out_dir: Path) -> FinishedParts:
    """Finished (workload, pool, mode) settings in ``out_dir/finished``, keyed by every
    parameter but the workloads and pools run (the compiled steps, and so the timings,
    do not depend on the pool size; see the module docstring)."""
    return FinishedParts.keyed_by(out_dir / "finished", p,
                                  ignore=("workloads", "pool_blocks"))


def _setting(p: Params, model: Decoder, params: Any, workload: str, pool: int, mode: str,
             reference: tuple[list[list[int]], list[list[int]]], bar: tqdm
             ) -> dict[str, Any]:
    """Warm-up + ``repeats`` measured runs of one setting, each on a fresh generator ->
    {"row", "requests"} (see :func:`_summary`)."""
    ref_prompts, ref_out = reference
    runs: list[list[PrefixGenerationStats]] = []
    identical = [True] * len(ref_prompts)
    for rep in range(1 + p.repeats):  # a fresh pool each time
        phase = "warm-up" if rep == 0 else f"run {rep}/{p.repeats}"
        bar.set_postfix_str(f"{workload} pool={pool} {mode} {phase}")
        gen = PrefixCachedGenerator(model, params, num_blocks=pool, block_size=p.block_size,
                                    prefix_caching=mode == "cache",
                                    device_blocks=max(p.pool_blocks), attention=p.attention)

        def cached(call: Call, gen: PrefixCachedGenerator = gen
                   ) -> tuple[list[list[int]], PrefixGenerationStats]:
            out, st = gen.generate(call, max_new_tokens=p.max_new_tokens)
            return out.tokens, st

        prompts, outs, stats = drive(p, workload, model.cfg.vocab_size, cached)
        identical = [same and pr == rp and o == ro for same, pr, o, rp, ro in
                     zip(identical, prompts, outs, ref_prompts, ref_out, strict=True)]
        if rep:
            runs.append(stats)
    row, requests = _summary(workload, pool, mode, runs, identical)
    row["device"] = jax.devices()[0].device_kind
    return {"row": row, "requests": requests}


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Every (workload, pool, cache on/off); write CSV and PNG into ``out_dir``."""
    spec, model, params = build_model(p.model, p.num_layers, p.vocab_size, p.dtype, p.seed)
    cfg = model.cfg
    n = p.max_new_tokens

    def dense(call: Call) -> tuple[list[list[int]], None]:
        return generate(model, params, call, max_new_tokens=n, cache="dense").tokens, None

    finished = finished_parts(p, out_dir)
    rows: list[dict[str, Any]] = []
    per_request: list[dict[str, Any]] = []
    total = len(p.workloads) * (1 + (1 + p.repeats) * len(p.pool_blocks) * len(MODES))
    with tqdm(total=total, desc="prefix-sharing", unit="run") as bar:
        for w in p.workloads:
            reference: tuple[list[list[int]], list[list[int]]] | None = None
            for pool in p.pool_blocks:
                for mode in MODES:
                    name = f"{w}-pool{pool}-{mode}"
                    done = finished.load(name)
                    if done is None:
                        if reference is None:
                            bar.set_postfix_str(f"{w} dense reference")
                            ref_prompts, ref_out, _ = drive(p, w, cfg.vocab_size, dense)
                            reference = ref_prompts, ref_out
                        done = _setting(p, model, params, w, pool, mode, reference, bar)
                        finished.save(name, done)
                    bar.update(1 + p.repeats)
                    rows.append(done["row"])
                    per_request += done["requests"]
            bar.update()
    for row in rows:
        base = next(r for r in rows if (r["workload"], r["pool_blocks"], r["mode"])
                    == (row["workload"], row["pool_blocks"], "no-cache"))
        row["ttft_speedup"] = base["ttft_mean_s"] / row["ttft_mean_s"]
    write_csv(out_dir / "prefix_sharing.csv", rows)
    write_csv(out_dir / "requests.csv", per_request)
    _plot(rows, p, out_dir / "prefix_sharing.png",
          f"prefix cache: {spec.name} shape, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
          f"{p.dtype}, random weights")
    return {"model": spec.name, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
            "dtype": p.dtype, "block_size": p.block_size,
            "request_tokens": {w: request_tokens(p, w) for w in p.workloads},
            "all_tokens_identical": all(r["tokens_identical"] for r in rows),
            "rows": rows}


def _plot(rows: list[dict[str, Any]], p: Params, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(p.workloads), figsize=(4.2 * len(p.workloads), 7),
                             squeeze=False)
    colors = {"cache": "tab:blue", "no-cache": "tab:red"}
    for col, w in enumerate(p.workloads):
        top, bottom = axes[0, col], axes[1, col]
        for mode in MODES:
            sel = [r for r in rows if r["workload"] == w and r["mode"] == mode]
            x = [r["pool_blocks"] for r in sel]
            top.plot(x, [1e3 * r["ttft_mean_s"] for r in sel], "o-", color=colors[mode],
                     label=f"{mode} mean")
            top.plot(x, [1e3 * r["ttft_p50_s"] for r in sel], "s--", color=colors[mode],
                     alpha=0.6, label=f"{mode} p50")
            if mode == "cache":
                bottom.plot(x, [100 * r["hit_rate"] for r in sel], "o-", color="tab:blue",
                            label="hit rate")
                bottom.plot(x, [100 * r["saved_fraction"] for r in sel], "s--",
                            color="tab:green", label="prefill saved")
        top.set_title(w)
        top.set_ylabel("TTFT (ms)")
        top.set_ylim(bottom=0)
        bottom.set_ylabel("% of prompt tokens")
        bottom.set_ylim(0, 100)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(p.pool_blocks), [str(b) for b in p.pool_blocks])
            ax.set_xlabel(f"pool size (blocks of {p.block_size} tokens)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
