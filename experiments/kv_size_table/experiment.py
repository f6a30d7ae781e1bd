"""kv-size-table: KV-cache bytes beside weight bytes for every preset model.

For each preset (``kvjax.analysis.presets``), each context length and each batch size,
the table gives the KV cache the batch holds at that context, the bytes of the weights,
their ratio, and the crossover context: the shortest context at which the batch's KV
cache outgrows the weights (``crossover_tokens``). A sliding window (Mistral-7B) caps
the cache, so its KV bytes stop growing and it may never cross over. Contexts beyond a
model's trained maximum are still sized (as if the model could run them) and flagged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvjax.analysis.presets import get_preset, preset_names
from kvjax.analysis.sizing import (
    cached_tokens,
    crossover_tokens,
    dtype_bits,
    kv_bytes,
    kv_bytes_per_token,
    param_count,
    weight_bytes,
)
from kvjax.runner import write_csv

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Params:
    """Models, contexts, batches and dtypes of the sizing table."""

    models: tuple[str, ...] = ()  # preset names; empty = every preset
    contexts: tuple[int, ...] = (4096, 32768, 131072)  # tokens per sequence
    batches: tuple[int, ...] = (1, 32)  # concurrent sequences
    kv_dtype: str = "bf16"  # KV-cache storage dtype (fp32, bf16, fp16, fp8, int8, int4)
    weight_dtype: str = "bf16"  # weight storage dtype

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError("contexts must be positive")
        if not self.batches or min(self.batches) < 1:
            raise ValueError("batches must be positive")
        dtype_bits(self.kv_dtype)
        dtype_bits(self.weight_dtype)
        for name in self.models:
            try:
                get_preset(name)
            except KeyError as err:
                raise ValueError(str(err)) from None


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _tokens_text(tokens: int | None) -> str:
    """Crossover context for a tick label: "at 3.7k", "at 120k", "at 6.5M", "never"."""
    if tokens is None:
        return "never"
    if tokens >= 2**20:
        return f"at {tokens / 2**20:.1f}M"
    return f"at {tokens / 1024:.0f}k" if tokens >= 10240 else f"at {tokens / 1024:.1f}k"


def table(p: Params) -> list[dict[str, Any]]:
    """One row per (model, batch, context)."""
    rows = []
    names = list(p.models) or preset_names()
    for name in tqdm(names, desc="presets", unit="model"):
        spec = get_preset(name)
        weights = weight_bytes(spec, p.weight_dtype)
        for batch in p.batches:
            cross = crossover_tokens(spec, p.kv_dtype, p.weight_dtype, batch)
            for ctx in p.contexts:
                kv = kv_bytes(spec, p.kv_dtype, batch, ctx)
                rows.append({
                    "model": spec.name,
                    "batch": batch,
                    "context": ctx,
                    "context_label": _context_label(ctx),
                    "beyond_max_context": ctx > spec.max_context_len,
                    "cached_tokens": cached_tokens(spec, ctx),
                    "kv_dtype": p.kv_dtype,
                    "weight_dtype": p.weight_dtype,
                    "params": param_count(spec),
                    "kv_bytes_per_token": kv_bytes_per_token(spec, p.kv_dtype),
                    "kv_bytes": kv,
                    "kv_gib": kv / GIB,
                    "weight_bytes": weights,
                    "weight_gib": weights / GIB,
                    "kv_to_weights": kv / weights,
                    "total_gib": (kv + weights) / GIB,
                    "crossover_tokens": cross,  # None: a sliding window keeps KV below weights
                })
    return rows


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Size every (model, batch, context); write ``kv_size_table.csv`` and the PNG."""
    rows = table(p)
    write_csv(out_dir / "kv_size_table.csv",
              ({k: ("never" if v is None else v) for k, v in r.items()} for r in rows))
    _plot(rows, p, out_dir / "kv_size_table.png")
    crossover: dict[str, dict[str, int | None]] = {r["model"]: {} for r in rows}
    for r in rows:
        crossover[r["model"]][str(r["batch"])] = r["crossover_tokens"]
    return {"crossover_tokens": crossover, "rows": rows}


def _plot(rows: list[dict[str, Any]], p: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    by_key = {(r["model"], r["batch"], r["context"]): r for r in rows}
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(contexts)))
    width = 0.8 / len(contexts)
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(8.0, 1.3 * len(models)), 3.6 * len(batches)),
                             squeeze=False)
    x = np.arange(len(models))
    for ax, batch in zip(axes[:, 0], batches, strict=True):
        for j, (ctx, color) in enumerate(zip(contexts, colors, strict=True)):
            vals = [by_key[(m, batch, ctx)]["kv_gib"] for m in models]
            beyond = [by_key[(m, batch, ctx)]["beyond_max_context"] for m in models]
            bars = ax.bar(x - 0.4 + (j + 0.5) * width, vals, width, color=color)
            for bar, hatch in zip(bars, beyond, strict=True):
                if hatch:
                    bar.set_hatch("///")
                    bar.set_edgecolor("white")
        for i, m in enumerate(models):
            w = by_key[(m, batch, contexts[0])]["weight_gib"]
            ax.hlines(w, i - 0.45, i + 0.45, color="tab:red", lw=2.5,
                      )
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 12)  # headroom for the legend
        ax.set_ylabel("GiB")
        labels = [f"{m}\nKV > W {_tokens_text(by_key[(m, batch, contexts[0])]['crossover_tokens'])}"
                  for m in models]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"batch {batch}: KV cache ({p.kv_dtype}) per context vs weights "
                     f"({p.weight_dtype}); tick labels: context where KV exceeds weights",
                     fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
    handles: list[Artist] = [
        Line2D([], [], color="tab:red", lw=2.5, label=f"weights ({p.weight_dtype})")]
    handles += [Patch(facecolor=c, label=f"KV at {_context_label(ctx)}")
                for ctx, c in zip(contexts, colors, strict=True)]
    handles.append(Patch(facecolor="grey", hatch="///", edgecolor="white",
                         label="beyond max context"))
    axes[0, 0].legend(handles=handles, fontsize=8, ncol=len(handles), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
