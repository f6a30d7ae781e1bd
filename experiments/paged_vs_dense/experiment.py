"""paged-vs-dense: how much reserved KV memory holds tokens, dense vs paged (PagedAttention).

A workload of requests with varied prompt and output lengths is placed (a) in a dense
cache that reserves ``max_context`` slots per request, as a static-shape server must,
and (b) in ``BlockAllocator`` pools of block sizes 8/16/32/64, each request allocated
for its prompt and then grown token by token to its final length. For each layout we
report the slots reserved vs holding tokens (waste = internal fragmentation for paged,
unused tail for dense) and how many requests fit, at their final lengths, into one
fixed memory budget. Bytes use a real model's KV bytes per token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvjax.analysis.presets import get_preset
from kvjax.analysis.sizing import kv_bytes_per_token
from kvjax.memory.allocator import BlockAllocator, OutOfBlocksError
from kvjax.runner import write_csv


@dataclasses.dataclass(frozen=True)
class Params:
    """Workload and layouts of the paged-vs-dense experiment."""

    num_requests: int = 1000  # requests in the workload
    max_context: int = 4096  # slots a dense cache reserves per request
    prompt_median: int = 400  # median prompt length (log-normal)
    output_median: int = 150  # median output length (log-normal)
    sigma: float = 0.9  # log-normal spread of both lengths
    block_sizes: tuple[int, ...] = (8, 16, 32, 64)  # paged layouts to compare
    budget_tokens: int = 262144  # memory budget, in KV token slots, for the "fit" count
    model: str = "llama-3-8b"  # preset giving KV bytes per token
    kv_dtype: str = "bf16"  # cache dtype for byte figures
    seed: int = 0  # workload seed

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.max_context < 2 or self.budget_tokens < 1:
            raise ValueError("num_requests, max_context and budget_tokens must be positive")
        if not self.block_sizes or min(self.block_sizes) < 1:
            raise ValueError("block_sizes must be positive")


def workload(p: Params) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths), int [N] each, with prompt + output <= max_context."""
    rng = np.random.default_rng(p.seed)
    prompt = np.clip(rng.lognormal(np.log(p.prompt_median), p.sigma, p.num_requests),
                     1, p.max_context // 2).astype(int)
    output = np.clip(rng.lognormal(np.log(p.output_median), p.sigma, p.num_requests),
                     1, p.max_context - prompt).astype(int)
    return prompt, output


def _paged_row(block_size: int, prompt: np.ndarray, output: np.ndarray,
               budget_tokens: int, bytes_per_token: int) -> dict[str, Any]:
    total = prompt + output
    pool = int(sum(-(-t // block_size) for t in total))
    alloc = BlockAllocator(pool, block_size, bytes_per_token)
    for i, (pl, ol) in enumerate(zip(prompt, output, strict=True)):
        alloc.allocate_sequence(i, int(pl))
        for _ in range(int(ol)):  # decode grows one token at a time
            alloc.append_token(i)
    st = alloc.stats()
    reserved = st.used_blocks * block_size
    fit_alloc = BlockAllocator(max(1, budget_tokens // block_size), block_size)
    fit = 0
    for i, t in enumerate(total):
        try:
            fit_alloc.allocate_sequence(i, int(t))
        except OutOfBlocksError:
            break
        fit += 1
    return {"layout": f"paged-{block_size}", "block_size": block_size,
            "reserved_tokens": reserved, "held_tokens": st.tokens_stored,
            "waste_pct": 100.0 * st.wasted_slots / reserved,
            "wasted_bytes": st.wasted_bytes, "requests_fit": fit}


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Compute every layout's memory use; write CSV and PNG into ``out_dir``."""
    bpt = kv_bytes_per_token(get_preset(p.model), p.kv_dtype)
    prompt, output = workload(p)
    total = prompt + output
    held = int(total.sum())
    dense_reserved = p.num_requests * p.max_context
    dense_fit = int(min(p.num_requests, p.budget_tokens // p.max_context))
    rows: list[dict[str, Any]] = [{"layout": "dense", "block_size": p.max_context,
                                   "reserved_tokens": dense_reserved,
             "held_tokens": held, "waste_pct": 100.0 * (1 - held / dense_reserved),
             "wasted_bytes": (dense_reserved - held) * bpt, "requests_fit": dense_fit}]
    for bs in tqdm(p.block_sizes, desc="paged layouts", unit="layout"):
        rows.append(_paged_row(bs, prompt, output, p.budget_tokens, bpt))
    for r in rows:
        r["reserved_gib"] = r["reserved_tokens"] * bpt / 2**30
        r["held_gib"] = r["held_tokens"] * bpt / 2**30
    write_csv(out_dir / "layouts.csv", rows)
    _plot(rows, p, out_dir / "paged_vs_dense.png")
    return {"kv_bytes_per_token": bpt, "held_tokens": held,
            "prompt_len_mean": float(prompt.mean()), "output_len_mean": float(output.mean()),
            "total_len_p50": float(np.median(total)), "total_len_max": int(total.max()),
            "layouts": rows}


def _plot(rows: list[dict[str, Any]], p: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [r["waste_pct"] for r in rows], color=["tab:red"] + ["tab:blue"] * (len(rows) - 1))
    a.set_ylabel("reserved KV slots holding no token (%)")
    a.set_title(f"{p.num_requests} requests, dense reserves {p.max_context}")
    for x, r in enumerate(rows):
        a.annotate(f"{r['waste_pct']:.1f}%", (x, r["waste_pct"]), ha="center", va="bottom")
    b.bar(names, [r["requests_fit"] for r in rows],
          color=["tab:red"] + ["tab:blue"] * (len(rows) - 1))
    b.set_ylabel("requests that fit")
    gib = p.budget_tokens * rows[0]["reserved_gib"] / max(rows[0]["reserved_tokens"], 1)
    b.set_title(f"budget {p.budget_tokens} slots = {gib:.1f} GiB ({p.model}, {p.kv_dtype})")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
