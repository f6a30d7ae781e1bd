"""The built-in demo: a small local model, every cache, one answer.

By default it loads the bundled trained model (``kvjax.assets.DEFAULT_MODEL``, a
Hugging Face checkpoint read through the real loading path), asks it one question per
task of its synthetic corpus (passkey, key->value recall, copy, grammar), and generates
the answers with no cache, the concat, dense and paged caches, then lets it write after
four short openings: it checks the tokens are identical across caches, and reports
speed, cache memory and which answers are right. ``--random``
builds a tiny random Llama checkpoint with ``transformers`` instead (no training, so
its words are noise).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.assets import DEFAULT_MODEL
from kvjax.data.synthetic import SyntheticCorpus, Task
from kvjax.engine.generate import CACHE_KINDS, GenerationOutput, generate, kv_bytes_per_token
from kvjax.models import LoadedModel, load_checkpoint, load_tokenizer
from kvjax.models.tiny import build_tiny_checkpoint

RANDOM_PROMPTS = (
    "yesterday I worked on the cache",
    "the model will work",
    "a key and a value for every token in the sequence of the prefix tree",
    "tomorrow",
)
# (task, distance) of the questions put to the trained model; its corpus's settings
QUESTIONS: tuple[tuple[Task, int], ...] = (
    ("passkey", 64), ("kv_recall", 32), ("copy", 8), ("grammar", 8), ("grammar", 16))
CORPUS = SyntheticCorpus(seq_len=128, kv_pairs=4)


def _timed(fn: Callable[[], GenerationOutput]) -> tuple[GenerationOutput, float]:
    """Run ``fn`` twice; return the second (warm, compiled) result and its wall time."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def compare_caches(lm: LoadedModel, prompts: list[list[int]],
                   max_new_tokens: int | list[int]) -> dict[str, list[list[int]]]:
    """Generate ``prompts`` greedily with every cache kind; print time, tokens/s and
    whether each equals the no-cache tokens; return the tokens by kind."""
    outputs: dict[str, list[list[int]]] = {}
    print(f"{'cache':<8}{'warm time':>12}{'tokens/s':>12}   identical to no cache")
    for kind in CACHE_KINDS:
        out, seconds = _timed(partial(generate, lm.model, lm.params, prompts,
                                      max_new_tokens=max_new_tokens, cache=kind))
        outputs[kind] = out.tokens
        n = sum(len(t) for t in outputs[kind])
        print(f"{kind:<8}{seconds:>10.3f} s{n / seconds:>12.1f}   "
              f"{outputs[kind] == outputs['none']}")
    return outputs


def _describe(lm: LoadedModel) -> None:
    cfg = lm.config
    bytes_per_token = kv_bytes_per_token(lm.model)
    print(f"model: {cfg.family}, {cfg.num_layers} layers, {cfg.num_heads} query heads, "
          f"{cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}; "
          f"KV cache {bytes_per_token} bytes per token ({jnp.dtype(lm.model.dtype).name})")


def run_trained(path: Path, max_new_tokens: int) -> int:
    """Ask the trained model one question per task with every cache, then let it write
    ``max_new_tokens`` (at most what its context leaves) after four short openings."""
    lm = load_checkpoint(path)
    tok = load_tokenizer(path)
    assert tok is not None
    _describe(lm)
    rng = np.random.default_rng(2026)
    text = CORPUS.example("grammar", 2, rng).tokens
    openings = [list(text[:n]) for n in (3, 6, 9, 12)]
    new = min(max_new_tokens, lm.config.max_position_embeddings - len(openings[-1]))
    print(f"writing: {len(openings)} openings of {[len(p) for p in openings]} tokens, {new} "
          "new tokens each, greedy\n")
    written = compare_caches(lm, openings, new)
    for opening, out in zip(openings[::2], written["dense"][::2], strict=True):
        print(f"  {tok.decode(opening)!r} -> {tok.decode(out)!r}")
    print()
    examples = [CORPUS.example(task, d, rng) for task, d in QUESTIONS]
    prompts = [list(e.tokens[: e.answer_start]) for e in examples]
    lens = [e.answer_len for e in examples]  # each answer's length: prompts fill the context
    print(f"{len(prompts)} questions (prompt lengths {[len(p) for p in prompts]}), "
          f"{lens} new tokens, greedy\n")
    outputs = compare_caches(lm, prompts, lens)
    right = 0
    print("\nquestions (last words of each prompt) -> answer (expected):")
    for e, out in zip(examples, outputs["paged"], strict=True):
        got, want = out, list(e.answer)
        right += got == want
        tail = tok.decode(list(e.tokens[max(1, e.answer_start - 14): e.answer_start]))
        print(f"  [{e.task}, distance {e.distance}] ... {tail} -> {tok.decode(got)!r} "
              f"({'right' if got == want else 'expected ' + repr(tok.decode(want))})")
    print(f"\n{right} of {len(examples)} right; accuracy by task and distance over the "
          "evaluation set: experiments/default_model/results/")
    print(f"(backend: {jax.default_backend()}, dtype {jnp.dtype(lm.model.dtype).name})")
    same = all(o == outputs["none"] for o in outputs.values())
    return 0 if same and all(o == written["none"] for o in written.values()) else 1


def run_random(directory: str | None, max_new_tokens: int) -> int:
    """Build (or reuse) a tiny random checkpoint in ``directory``; compare the caches."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(directory) if directory else Path(tmp) / "tiny-llama"
        if not (path / "config.json").is_file():
            print(f"building a tiny random Llama checkpoint in {path} ...")
            build_tiny_checkpoint(path, family="llama", num_layers=4, hidden_size=128,
                                  num_heads=8, num_kv_heads=2, intermediate_size=256,
                                  llama3_rope_scaling=True)
        lm = load_checkpoint(path)
        tok = load_tokenizer(path)
        assert tok is not None
        _describe(lm)
        prompts = [tok.encode(p, add_special_tokens=False) for p in RANDOM_PROMPTS]
        print(f"batch of {len(prompts)} prompts, lengths {[len(p) for p in prompts]}, "
              f"{max_new_tokens} new tokens each, greedy\n")
        outputs = compare_caches(lm, prompts, max_new_tokens)
        for prompt, toks in zip(RANDOM_PROMPTS, outputs["dense"], strict=True):
            print(f"  {prompt!r} -> {tok.decode(toks)!r} ({len(toks)} ids)")
        print(f"\n(random weights, so the words are noise; backend: {jax.default_backend()}, "
              f"dtype {jnp.dtype(lm.model.dtype).name})")
        return 0 if all(o == outputs["none"] for o in outputs.values()) else 1


def run_demo(directory: str | None, max_new_tokens: int, *, random: bool = False) -> int:
    """The trained model's questions, or with ``random`` the tiny random checkpoint."""
    if random or directory is not None:
        return run_random(directory, max_new_tokens)
    return run_trained(DEFAULT_MODEL, max_new_tokens)
