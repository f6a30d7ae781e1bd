"""attention-sweep: quality against KV bytes per token for attention variants trained from
scratch at a matched parameter budget, and for the same savings made by conversion.

Every variant (``mha``, ``gqa-G``, ``mqa``, ``mla-R``; :mod:`kvjax.train.variants`) shares
vocabulary, width, depth and query heads; its MLP width is chosen so its parameter count
is within ``budget_tolerance`` of the MHA model's (``mha_intermediate_size`` sets that
budget). Each is trained with the same schedule on the same stream of the synthetic
corpus (:mod:`kvjax.data.synthetic`) and evaluated on one fixed set: every task at every
feasible ``eval_distances`` entry. Reported per variant: parameters, KV bytes per token
(``kv_dtype``), eval loss over all tokens, answer loss, exact-match answer accuracy
overall and by (task, distance) (teacher-forced argmax, equal to greedy decoding, see
:mod:`kvjax.train.evaluate`), decode tokens/s of ``generate`` with the dense cache
(``decode_batch`` prompts of ``decode_prompt_len`` tokens, ``decode_new_tokens`` new
tokens each, prefill included, float32, after one warm-up call), and the largest batch of
``budget_context``-token sequences whose KV cache fits ``memory_budget_gib`` beside the
weights (sizing calculator, ``weight_dtype`` weights; activations not counted).

Conversions start from the trained MHA model, with no fine-tuning: K/V heads mean-pooled
to ``gqa-G`` / ``mqa`` (:func:`kvjax.convert.mean_pool_kv_heads`) and K/V projections
factorised to ``mla-R`` by SVD keeping ``convert_rope_dim`` RoPE dims per head
(:func:`kvjax.convert.to_mla`; its cache is R + heads * convert_rope_dim values per token
and layer, more than a trained ``mla-R``'s). Each row gives the quality before (the MHA
model) and after. With ``finetune_steps > 0`` each conversion is also fine-tuned (uptrained)
for that many steps on a fresh stream of the same corpus (same peak lr, answer weight and
batch; warm-up a tenth of the steps) and reported as a second row ``mha->X+ftN``, whose
"before" is the converted model's quality.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from kvjax.analysis.sizing import dtype_bits, kv_bytes_per_token, max_batch
from kvjax.analysis.spec import ArchSpec
from kvjax.config import ModelConfig
from kvjax.convert import mean_pool_kv_heads, to_mla
from kvjax.data.synthetic import TASKS, Example, SyntheticCorpus, Task
from kvjax.data.vocab import Vocab
from kvjax.engine.generate import generate
from kvjax.models import load_checkpoint
from kvjax.resume import FinishedParts
from kvjax.runner import write_csv
from kvjax.train.checkpoint import save_checkpoint
from kvjax.train.evaluate import evaluate
from kvjax.train.loop import Model, TrainConfig, TrainResult, model_for, train
from kvjax.train.variants import (
    AnyConfig,
    BaseShape,
    Variant,
    build_config,
    count_params,
    match_budget,
)


@dataclasses.dataclass(frozen=True)
class Params:
    """Base shape, variants, training schedule, evaluation and the memory budget."""

    variants: tuple[str, ...] = ("mha", "gqa-4", "gqa-2", "mqa", "mla-16", "mla-32")
    hidden_size: int = 64  # residual width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 8  # query heads
    head_dim: int = 16  # head width (MLA: non-RoPE q/k and v per head)
    mha_intermediate_size: int = 192  # the MHA model's MLP width: sets the parameter budget
    mla_rope_head_dim: int = 8  # trained MLA: width of the shared RoPE key head
    mlp_multiple: int = 1  # MLP widths are multiples of this
    budget_tolerance: float = 0.05  # largest relative parameter mismatch accepted
    seq_len: int = 128  # training / eval sequence length (and max context)
    tasks: tuple[str, ...] = TASKS  # corpus tasks
    max_train_distance: int = 0  # cap on training distances (0 = seq_len allows)
    kv_pairs: int = 4  # key->value pairs per example
    steps: int = 200  # optimizer steps per variant
    batch_size: int = 16  # sequences per step
    peak_lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 20  # linear warmup
    answer_weight: float = 1.0  # loss weight of answer tokens
    eval_distances: tuple[int, ...] = (2, 8, 16, 32, 64, 100)  # evaluated distances
    eval_per_distance: int = 16  # examples per task and distance
    conversions: tuple[str, ...] = ("gqa-4", "gqa-2", "mqa", "mla-16", "mla-32")  # from mha
    convert_rope_dim: int = 4  # MHA -> MLA: RoPE dims kept per head
    finetune_steps: int = 0  # fine-tune each conversion this many steps (0 = none)
    decode_batch: int = 4  # sequences in the decode-speed run
    decode_prompt_len: int = 32  # prompt tokens of the decode-speed run
    decode_new_tokens: int = 32  # generated tokens per sequence
    memory_budget_gib: float = 80.0  # memory for weights + KV cache
    budget_context: int = 0  # tokens per sequence for the largest batch (0 = seq_len)
    kv_dtype: str = "bf16"  # KV-cache dtype for bytes per token and the largest batch
    weight_dtype: str = "bf16"  # weight dtype for the largest batch
    save_checkpoints: bool = False  # write each trained variant to out_dir/checkpoints
    seed: int = 0  # init, data stream and eval set

    def __post_init__(self) -> None:
        self.corpus()
        self.train_config()
        variants = [Variant.parse(v, self.num_heads) for v in self.variants]
        if not variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be non-empty and distinct, got {self.variants}")
        if self.conversions and "mha" not in self.variants:
            raise ValueError("conversions start from the trained mha model: add 'mha' to variants")
        shape = self.shape()
        for v in variants:
            match_budget(v, shape, self.target_params(), multiple=self.mlp_multiple,
                         tolerance=self.budget_tolerance)
        d = self.head_dim
        if self.convert_rope_dim % 2 or not 2 <= self.convert_rope_dim <= d:
            raise ValueError(f"convert_rope_dim must be even and in [2, {d}]")
        full_rank = min(self.hidden_size, self.num_heads * (2 * d - self.convert_rope_dim))
        for name in self.conversions:
            c = Variant.parse(name, self.num_heads)
            if c.kv_heads == self.num_heads:
                raise ValueError("a conversion must shrink the cache: 'mha' is not a target")
            if c.kv_lora_rank is not None and c.kv_lora_rank > full_rank:
                raise ValueError(f"conversion {name!r}: rank above the full rank {full_rank}")
        if self.decode_prompt_len + self.decode_new_tokens > self.seq_len or min(
                self.decode_batch, self.decode_prompt_len, self.decode_new_tokens) < 1:
            raise ValueError("decode_batch, decode_prompt_len, decode_new_tokens must be >= 1 "
                             "and prompt + new tokens <= seq_len")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if not self.eval_distances or self.eval_per_distance < 1:
            raise ValueError("eval_distances must be non-empty and eval_per_distance >= 1")
        dtype_bits(self.kv_dtype)
        dtype_bits(self.weight_dtype)
        if not self.memory_budget_gib > 0 or self.budget_context < 0:
            raise ValueError("memory_budget_gib must be positive and budget_context >= 0")

    def corpus(self) -> SyntheticCorpus:
        """The training and evaluation corpus."""
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown tasks {bad}; known: {TASKS}")
        tasks: tuple[Task, ...] = tuple(t for t in TASKS if t in self.tasks)
        return SyntheticCorpus(seq_len=self.seq_len, tasks=tasks,
                               max_distance=self.max_train_distance, kv_pairs=self.kv_pairs)

    def train_config(self) -> TrainConfig:
        """The schedule every variant is trained with."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, peak_lr=self.peak_lr,
                           warmup_steps=self.warmup_steps, answer_weight=self.answer_weight,
                           seed=self.seed)

    def finetune_config(self) -> TrainConfig:
        """The schedule a conversion is fine-tuned with (``finetune_steps`` >= 1): a data
        stream other than the variants' (seed + 1)."""
        return dataclasses.replace(self.train_config(), steps=self.finetune_steps,
                                   warmup_steps=self.finetune_steps // 10, seed=self.seed + 1)

    def shape(self) -> BaseShape:
        """What every variant shares."""
        return BaseShape(vocab_size=Vocab().size, hidden_size=self.hidden_size,
                         num_layers=self.num_layers, num_heads=self.num_heads,
                         head_dim=self.head_dim, intermediate_size=self.mha_intermediate_size,
                         max_position_embeddings=self.seq_len,
                         mla_rope_head_dim=self.mla_rope_head_dim)

    def target_params(self) -> int:
        """The parameter budget: the MHA model's count."""
        mha = Variant.parse("mha", self.num_heads)
        return count_params(build_config(mha, self.shape(), self.mha_intermediate_size))


def _quality(ev: dict[str, Any]) -> dict[str, float]:
    return {"eval_loss": ev["loss"], "answer_loss": ev["answer_loss"],
            "accuracy": ev["accuracy"]}


def decode_tokens_per_second(model: Model, params: Any, prompts: list[list[int]],
                             new_tokens: int) -> float:
    """Generated tokens per second of ``generate`` (dense cache, greedy, prefill
    included), timed on the second of two identical calls."""
    generate(model, params, prompts, max_new_tokens=new_tokens, cache="dense")
    start = time.perf_counter()
    generate(model, params, prompts, max_new_tokens=new_tokens, cache="dense")
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def _training_fields(result: TrainResult) -> dict[str, float]:
    return {"train_seconds": result.seconds, "train_tokens_per_s": result.tokens_per_second,
            "first_train_loss": result.history[0]["loss"],
            "final_train_loss": result.history[-1]["loss"]}


def _sizes(cfg: AnyConfig, name: str, p: Params) -> dict[str, Any]:
    spec = ArchSpec.from_config(cfg, name)
    context = p.budget_context or p.seq_len
    return {"params": count_params(cfg), "kv_bytes_per_token": kv_bytes_per_token(
                spec, p.kv_dtype),
            "max_batch": max_batch(spec, p.kv_dtype, p.weight_dtype,
                                   int(p.memory_budget_gib * 2**30), context)}


def finished_parts(p: Params, out_dir: Path) -> FinishedParts:
    """Finished variants and conversions in ``out_dir/finished``, keyed by every parameter
    their results depend on (not which variants and conversions run, nor checkpoints; the
    fine-tuning steps are part of a fine-tuned conversion's name)."""
    return FinishedParts.keyed_by(
        out_dir / "finished", p,
        ignore=("variants", "conversions", "save_checkpoints", "finetune_steps"))


def _train_variant(p: Params, name: str, corpus: SyntheticCorpus, examples: list[Example],
                   prompts: list[list[int]], out_dir: Path) -> tuple[dict[str, Any], Any]:
    """Train, evaluate, size and time one variant -> ({"row", "by_distance"}, params)."""
    cfg = match_budget(Variant.parse(name, p.num_heads), p.shape(), p.target_params(),
                       multiple=p.mlp_multiple, tolerance=p.budget_tolerance)
    model = model_for(cfg)
    result = train(model, corpus, p.train_config(), log_every=max(1, p.steps // 20))
    ev = evaluate(model, result.params, examples, p.seq_len)
    if p.save_checkpoints:
        save_checkpoint(out_dir / "checkpoints" / name, cfg, result.params, corpus.vocab)
    row = {
        "model": name, "kind": "trained", "intermediate_size": cfg.intermediate_size,
        **_sizes(cfg, name, p), **_quality(ev),
        **_training_fields(result),
        "decode_tokens_per_s": decode_tokens_per_second(model, result.params, prompts,
                                                        p.decode_new_tokens),
        "device": jax.devices()[0].device_kind, "history": list(result.history)}
    return {"row": row, "by_distance": [{"model": name, **r} for r in ev["by_distance"]]}, (
        cfg, result.params)


def run(p: Params, out_dir: Path) -> dict[str, Any]:
    """Train and evaluate every variant, convert the MHA model; write CSVs and the plot.

    Each finished variant and conversion is saved under ``out_dir/finished`` as it
    completes; a later run into the same folder with the same parameters reuses it, so a
    sweep cut off by a time limit, or split over several runs (different ``variants``),
    resumes where it stopped and the last run writes the whole table. The conversions
    run right after the MHA model; when its result is reused, its weights come from
    ``out_dir/checkpoints/mha`` (``save_checkpoints``).
    """
    corpus = p.corpus()
    examples = corpus.eval_examples(p.eval_distances, p.eval_per_distance, p.seed)
    prompts = [list(ex.tokens[:p.decode_prompt_len]) for ex in examples[:p.decode_batch]]
    finished = finished_parts(p, out_dir)
    variants: list[dict[str, Any]] = []
    conversions: list[dict[str, Any]] = []
    by_distance: list[dict[str, Any]] = []
    for name in tqdm(p.variants, desc="variants", unit="variant"):
        done = finished.load(name)
        trained = None
        if done is None:
            done, trained = _train_variant(p, name, corpus, examples, prompts, out_dir)
            finished.save(name, done)
        variants.append(done["row"])
        by_distance += done["by_distance"]
        if name == "mha" and p.conversions:
            for conv in _conversions(p, done["row"], trained, corpus, examples, out_dir,
                                     finished):
                conversions.append(conv["row"])
                by_distance += conv["by_distance"]
    target = p.target_params()
    results = {"target_params": target, "eval_examples": len(examples),
               "accuracy_method": "teacher-forced argmax exact match (= greedy decoding)",
               "variants": variants, "conversions": conversions,
               "accuracy_by_distance_all_tasks": accuracy_table(by_distance)}
    write_csv(out_dir / "attention_sweep.csv",
               [{k: v for k, v in r.items() if k != "history"} for r in variants]
               + [{k: v for k, v in r.items() if k not in ("before", "svd_errors", "history")}
                  for r in conversions])
    write_csv(out_dir / "accuracy_by_distance.csv", by_distance)
    results["accuracy_by_distance"] = by_distance
    _plot(results, p, out_dir / "attention_sweep.png")
    return results


def _conversions(p: Params, mha_row: dict[str, Any], trained: tuple[AnyConfig, Any] | None,
                 corpus: SyntheticCorpus, examples: list[Example], out_dir: Path,
                 finished: FinishedParts) -> list[dict[str, Any]]:
    """Each conversion of the trained MHA model (``trained``: its config and weights when
    trained in this run), evaluated as converted and, with ``finetune_steps``, after
    fine-tuning -> [{"row", "by_distance"}] in that order."""
    before = _quality_of(mha_row)
    out = []
    for name in p.conversions:
        label = f"mha->{name}"
        tuned_label = f"{label}+ft{p.finetune_steps}"
        done = finished.load(label)
        tuned = finished.load(tuned_label) if p.finetune_steps else None
        converted = None
        if done is None or (p.finetune_steps and tuned is None):
            if trained is None:
                trained = _load_mha(out_dir, finished)
            converted = _convert(p, name, trained)
        if done is None:
            assert converted is not None
            done = _evaluate_conversion(p, label, converted, before, examples)
            finished.save(label, done)
        out.append(done)
        if p.finetune_steps:
            if tuned is None:
                assert converted is not None
                tuned = _finetune_conversion(p, tuned_label, converted,
                                             _quality_of(done["row"]), corpus, examples)
                finished.save(tuned_label, tuned)
            out.append(tuned)
    return out


def _load_mha(out_dir: Path, finished: FinishedParts) -> tuple[AnyConfig, Any]:
    path = out_dir / "checkpoints" / "mha"
    if not path.is_dir():
        raise FileNotFoundError(
            f"the conversions need the trained mha model: its result was reused but "
            f"{path} does not exist (run with save_checkpoints: true, or delete "
            f"{finished.path('mha')} to train it again)")
    loaded = load_checkpoint(path)
    return loaded.config, loaded.params


@dataclasses.dataclass(frozen=True)
class _Converted:
    """A converted model: its config, weights, how it was made and its SVD errors."""

    cfg: AnyConfig
    params: Any
    method: str
    svd_errors: list[float]


def _convert(p: Params, name: str, mha: tuple[AnyConfig, Any]) -> _Converted:
    mha_cfg, mha_params = mha
    assert isinstance(mha_cfg, ModelConfig)
    target = Variant.parse(name, p.num_heads)
    if target.kv_lora_rank is None:
        assert target.kv_heads is not None
        cfg, params = mean_pool_kv_heads(mha_cfg, mha_params, target.kv_heads)
        return _Converted(cfg, params, "mean-pool", [])
    conv = to_mla(mha_cfg, mha_params, target.kv_lora_rank, rope_dim=p.convert_rope_dim)
    return _Converted(conv.config, conv.params, f"svd (rope_dim {p.convert_rope_dim})",
                      list(conv.errors))


def _quality_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("eval_loss", "answer_loss", "accuracy")}


def _evaluate_conversion(p: Params, label: str, c: _Converted, before: dict[str, Any],
                         examples: list[Example]) -> dict[str, Any]:
    ev = evaluate(model_for(c.cfg), c.params, examples, p.seq_len)
    row = {"model": label, "kind": f"converted: {c.method}, no fine-tuning",
           "intermediate_size": c.cfg.intermediate_size, **_sizes(c.cfg, label, p),
           **_quality(ev), "before": before, "svd_errors": c.svd_errors}
    return {"row": row, "by_distance": [{"model": label, **r} for r in ev["by_distance"]]}


def _finetune_conversion(p: Params, label: str, c: _Converted, before: dict[str, Any],
                         corpus: SyntheticCorpus, examples: list[Example]) -> dict[str, Any]:
    """Fine-tune the converted model ``finetune_steps`` steps, then evaluate it; "before"
    is the converted model's quality."""
    model = model_for(c.cfg)
    result = train(model, corpus, p.finetune_config(), log_every=max(1, p.finetune_steps // 20),
                   params=c.params)
    ev = evaluate(model, result.params, examples, p.seq_len)
    row = {"model": label,
           "kind": f"converted: {c.method}, fine-tuned {p.finetune_steps} steps",
           "intermediate_size": c.cfg.intermediate_size, **_sizes(c.cfg, label, p),
           **_quality(ev), **_training_fields(result),
           "device": jax.devices()[0].device_kind, "before": before,
           "svd_errors": c.svd_errors, "history": list(result.history)}
    return {"row": row, "by_distance": [{"model": label, **r} for r in ev["by_distance"]]}


def _plot(res: dict[str, Any], p: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "accuracy", "answer exact-match accuracy"),
                           (axes[1], "answer_loss", "answer-token loss (nats)")):
        converted = [r for r in res["conversions"] if "fine-tuned" not in r["kind"]]
        tuned = [r for r in res["conversions"] if "fine-tuned" in r["kind"]]
        for rows, marker, fill in ((res["variants"], "o", True), (converted, "s", False),
                                   (tuned, "^", False)):
            for i, r in enumerate(rows):
                color = f"C{i % 10}"
                ax.plot(r["kv_bytes_per_token"], r[key], marker, color=color,
                        markerfacecolor=color if fill else "none", markersize=8)
                ax.annotate(r["model"], (r["kv_bytes_per_token"], r[key]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"KV bytes per token ({p.kv_dtype})")
        ax.set_ylabel(label)
    tuned_note = (f"; fine-tuned {p.finetune_steps} steps (triangles)"
                  if p.finetune_steps and p.conversions else "")
    axes[0].set_title(f"trained at ~{res['target_params'] / 1e6:.2f}M params (filled), "
                      f"converted from mha (squares){tuned_note}", fontsize=9)
    axes[1].set_title(f"{p.steps} steps x {p.batch_size} x {p.seq_len} tokens, "
                      f"{res['eval_examples']} eval examples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_table(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{model: {distance: accuracy over tasks}}`` from the by-distance rows (examples
    weighted)."""
    out: dict[str, dict[int, list[tuple[float, int]]]] = {}
    for r in rows:
        out.setdefault(r["model"], {}).setdefault(r["distance"], []).append(
            (r["accuracy"], r["examples"]))
    return {m: {d: float(np.average([a for a, _ in v], weights=[n for _, n in v]))
                for d, v in sorted(ds.items())} for m, ds in out.items()}
