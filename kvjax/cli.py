"""The ``kvjax`` command line: ``demo``, ``generate``, ``run``, ``size`` and ``serve-bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvjax.analysis.size_cli import register as register_size
from kvjax.cache.paged import ATTENTION_BACKENDS
from kvjax.engine.generate import CACHE_KINDS
from kvjax.engine.serve_bench import register as register_serve_bench
from kvjax.memory.blob_store import BACKENDS as L3_BACKENDS
from kvjax.memory.disk_store import DEFAULT_BACKEND as L3_DEFAULT_BACKEND
from kvjax.memory.tiered_requests import PREFETCH_POLICIES

_DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise UsageError(f"--token-ids expects comma-separated integers, got {text!r}") from err


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text or token ids from a local checkpoint")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more text prompts (needs a tokenizer)")
    src.add_argument("--token-ids", nargs="+", help="one or more prompts as ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache", choices=CACHE_KINDS, default="dense")
    p.add_argument("--block-size", type=int, default=16, help="tokens per page (paged cache)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="pages in the pool (paged cache; default: just enough)")
    p.add_argument("--attention", choices=("auto", *ATTENTION_BACKENDS), default="auto",
                   help="paged decode attention: auto = the Triton kernel on GPU (the Pallas "
                        "one if Triton cannot launch), else XLA")
    p.add_argument("--prefix-cache", action="store_true",
                   help="with --cache paged: run the prompts one after another through a "
                        "radix prefix cache, so later prompts reuse the KV of earlier "
                        "prompts and outputs")
    p.add_argument("--l2-blocks", type=int, default=0,
                   help="with --prefix-cache: host slots (blocks) under the pool; evicted "
                        "blocks move there instead of being dropped")
    p.add_argument("--l3-dir", default=None,
                   help="with --prefix-cache: directory of checksummed block files under "
                        "the host tier, kept across runs (keyed by the model directory)")
    p.add_argument("--l3-backend", choices=L3_BACKENDS, default=L3_DEFAULT_BACKEND,
                   help="with --l3-dir: how block files are written and read (the same files "
                        "either way)")
    p.add_argument("--prefetch", choices=PREFETCH_POLICIES, default="wait_complete",
                   help="with --l3-dir: how a request waits for its disk blocks")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop-ids", default=None,
                   help="comma-separated stop ids (default: the model's eos ids)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from kvjax.engine.generate import generate
    from kvjax.engine.sampling import SamplingParams
    from kvjax.models import CheckpointError, load_checkpoint, load_tokenizer

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prefix_cache and args.cache != "paged":
        raise UsageError(f"--prefix-cache needs --cache paged, got --cache {args.cache}")
    if (args.l2_blocks or args.l3_dir is not None) and not args.prefix_cache:
        raise UsageError("--l2-blocks and --l3-dir need --prefix-cache")
    if args.l2_blocks < 0:
        raise UsageError(f"--l2-blocks must be >= 0, got {args.l2_blocks}")
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UsageError(str(err)) from err
    path = Path(args.model)
    if not path.is_dir():
        raise UsageError(f"model directory {path} does not exist")
    try:
        lm = load_checkpoint(path, dtype=getattr(jnp, args.dtype))
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    tokenizer = load_tokenizer(path)
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError(f"{path} has no tokenizer; pass --token-ids instead of --prompt")
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in args.prompt]
    else:
        prompts = [_parse_ids(t) for t in args.token_ids]
    stops = (_parse_ids(args.stop_ids) if args.stop_ids is not None
             else list(lm.config.eos_token_ids))
    start = time.perf_counter()
    prefix: dict[str, Any] | None = None
    try:
        if args.prefix_cache:
            out, prefix = _generate_prefix_cached(lm, prompts, args, sampling, stops)
        else:
            out = generate(lm.model, lm.params, prompts, max_new_tokens=args.max_new_tokens,
                           cache=args.cache, sampling=sampling, seed=args.seed,
                           stop_token_ids=stops, block_size=args.block_size,
                           num_blocks=args.num_blocks, attention=args.attention)
    except ValueError as err:
        raise UsageError(str(err)) from err
    seconds = time.perf_counter() - start
    results = []
    for prompt, toks, reason in zip(prompts, out.tokens, out.finish_reasons, strict=True):
        item: dict[str, Any] = {"prompt_ids": prompt, "token_ids": toks, "finish_reason": reason}
        if tokenizer is not None:
            item["text"] = tokenizer.decode(toks)
        results.append(item)
    if prefix is not None:
        for item, row in zip(results, prefix.pop("requests"), strict=True):
            item["prefix"] = row
    if args.json:
        record = {"model": str(path), "cache": args.cache, "dtype": args.dtype,
                  "seed": args.seed, "seconds": round(seconds, 4), "results": results}
        if prefix is not None:
            record["prefix_cache"] = prefix
        print(json.dumps(record))
    else:
        for i, item in enumerate(results):
            shown = item.get("text", item["token_ids"])
            print(f"[{i}] {shown}  ({len(item['token_ids'])} tokens, {item['finish_reason']})")
        if prefix is not None:
            print(f"prefix cache: {prefix['hit_tokens']}/{prefix['prompt_tokens']} prompt tokens "
                  f"hit, {prefix['prefill_tokens_saved']} prefill tokens saved, "
                  f"{prefix['evicted_blocks']} blocks evicted")
            if "tiers" in prefix:
                t = prefix["tiers"]
                print(f"tiers: hit tokens L1/L2/L3 {t['hit_tokens']['L1']}/"
                      f"{t['hit_tokens']['L2']}/{t['hit_tokens']['L3']}, "
                      f"{t['blocks']['l1_to_l2']} blocks to host, {t['blocks']['to_l3']} to disk")
        print(f"{args.cache} cache, {seconds:.2f} s (compilation included)")
    return 0


def _generate_prefix_cached(lm: Any, prompts: list[list[int]], args: argparse.Namespace,
                            sampling: Any, stops: list[int]) -> tuple[Any, dict[str, Any]]:
    """The prompts one at a time, in order, through one ``PrefixCachedGenerator``.

    Prompt ``i`` samples with seed ``--seed + i``. The default pool holds every
    prompt + output at once, so nothing is evicted.
    """
    from kvjax.engine.generate import GenerationOutput
    from kvjax.engine.prefix_generate import PrefixCachedGenerator
    from kvjax.memory.tiered_requests import TierConfig

    bs, n = args.block_size, args.max_new_tokens
    if bs < 1 or (args.num_blocks is not None and args.num_blocks < 1):
        raise UsageError("--block-size and --num-blocks must be positive")
    num_blocks = args.num_blocks or sum(-(-(len(p) + n) // bs) for p in prompts)
    tiers = None
    if args.l2_blocks or args.l3_dir is not None:
        tiers = TierConfig(host_blocks=args.l2_blocks, disk_dir=args.l3_dir,
                           disk_backend=args.l3_backend,
                           namespace=str(Path(args.model).resolve()), prefetch=args.prefetch)
    gen = PrefixCachedGenerator(lm.model, lm.params, num_blocks=num_blocks, block_size=bs,
                                tiers=tiers, attention=args.attention)
    tokens, reasons, rows = [], [], []
    for i, prompt in enumerate(prompts):
        out, st = gen.generate([prompt], max_new_tokens=n, sampling=sampling,
                               seed=args.seed + i, stop_token_ids=stops)
        tokens += out.tokens
        reasons += out.finish_reasons
        r = st.requests[0]
        rows.append({"hit_tokens": r.hit_tokens, "prefill_tokens_saved": r.prefill_tokens_saved,
                     "prefill_tokens_computed": r.prefill_tokens_computed,
                     "evicted_blocks": st.evicted_blocks, "ttft_s": round(r.ttft_s, 6)})
    total = gen.stats()
    summary = {"num_blocks": num_blocks, "block_size": bs, "prompt_tokens": total.lookup_tokens,
               "hit_tokens": total.hit_tokens, "hit_rate": total.hit_rate,
               "prefill_tokens_saved": total.prefill_tokens_saved,
               "prefill_tokens_computed": total.lookup_tokens - total.prefill_tokens_saved,
               "evictions": total.evictions, "evicted_blocks": total.evicted_blocks,
               "requests": rows}
    if tiers is not None:
        gen.persist()  # the next run with this --l3-dir starts from every block
        summary["tiers"] = gen.tier_stats()
    return GenerationOutput(tokens, reasons), summary


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="the bundled trained model answers its tasks with "
                       "every cache")
    p.add_argument("--random", action="store_true",
                   help="a tiny random checkpoint built with transformers instead of the "
                        "bundled trained model")
    p.add_argument("--dir", default=None, help="where to build the tiny random checkpoint "
                   "(implies --random; default: a temporary directory)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="new tokens per prompt when writing (capped by the context)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from kvjax.demo import run_demo

    return run_demo(args.dir, args.max_new_tokens, random=args.random)


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run the experiment a YAML config names")
    p.add_argument("config", help="path to configs/NAME.yaml")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the config's params (value read as YAML); repeatable")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from kvjax import runner

    try:
        cfg = runner.load(args.config, args.output_dir, runner.parse_overrides(args.set))
    except runner.ExperimentConfigError as err:
        raise UsageError(str(err)) from err
    record = runner.run(cfg)
    print(f"{cfg.experiment}: done in {record['seconds']:.1f} s; results in {cfg.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_generate(sub)
    _add_run(sub)
    register_size(sub)
    register_serve_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kvjax: %(message)s"))
    log = logging.getLogger("kvjax")  # our messages only, not JAX's backend probing
    if not log.handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"kvjax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
