"""The synthetic corpus: determinism, exact distances, answers that really are the answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvjax.data import TASKS, SyntheticCorpus, Task, Vocab
from kvjax.data.vocab import EOS_ID, PAD_ID, THIRD_PERSON


def _corpus(seq_len: int = 96) -> SyntheticCorpus:
    return SyntheticCorpus(seq_len=seq_len)


def test_training_batches_are_a_function_of_seed_and_step() -> None:
    c = _corpus()
    seed = int(np.random.default_rng().integers(1 << 30))
    a, b = c.training_batch(8, seed, 5), c.training_batch(8, seed, 5)
    for field in ("tokens", "valid", "answer", "distance", "task"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.tokens, c.training_batch(8, seed, 6).tokens)
    assert a.tokens.dtype == np.int32 and a.tokens.shape == (8, 96)


def _words(c: SyntheticCorpus, ids: tuple[int, ...]) -> list[str]:
    return c.vocab.decode(ids).split()


@pytest.mark.parametrize("task", TASKS)
def test_every_feasible_distance_is_exact_and_fits(task: Task) -> None:
    c = _corpus()
    rng = np.random.default_rng()
    lo, hi = c.distance_range(task)
    for d in range(lo, hi + 1):
        if not c.feasible(task, d):
            with pytest.raises(ValueError, match="cannot make distance"):
                c.example(task, d, rng)
            continue
        ex = c.example(task, d, rng)
        assert ex.distance == d and len(ex.tokens) <= c.seq_len and ex.tokens[-1] == EOS_ID
        end = ex.answer_start + ex.answer_len  # the answer ends the example (grammar: then ".")
        assert end == len(ex.tokens) - (2 if task == "grammar" else 1)
    with pytest.raises(ValueError):
        c.example(task, hi + 1, rng)


def test_passkey_answer_is_the_key_at_the_stated_distance() -> None:
    c, rng = _corpus(), np.random.default_rng()
    for d in rng.integers(*c.distance_range("passkey"), size=20):
        ex = c.example("passkey", int(d), rng)
        words = _words(c, ex.tokens)
        key_at = ex.answer_start - ex.distance
        assert words[key_at - 4:key_at] == ["the", "pass", "key", "is"]
        assert ex.tokens[key_at:key_at + c.passkey_digits] == ex.answer
        assert words[ex.answer_start - 6:ex.answer_start] == "what is the pass key ?".split()
        assert all(w.isdigit() for w in _words(c, ex.answer))


def test_kv_recall_answer_is_the_queried_keys_value() -> None:
    c, rng = _corpus(), np.random.default_rng()
    for d in rng.integers(*c.distance_range("kv_recall"), size=20):
        ex = c.example("kv_recall", int(d), rng)
        words = _words(c, ex.tokens)
        queried = words[ex.answer_start - 2]
        value_at = ex.answer_start - ex.distance
        # The queried key appears once among the pairs, right before ":" and its value.
        pairs = [i for i, w in enumerate(words[:value_at + 1]) if w == queried]
        assert pairs == [value_at - 2] and words[value_at - 1] == ":"
        assert ex.tokens[value_at:value_at + c.value_digits] == ex.answer


def test_copy_answer_repeats_the_span() -> None:
    c, rng = _corpus(), np.random.default_rng()
    for d in rng.integers(*c.distance_range("copy"), size=20):
        ex = c.example("copy", int(d), rng)
        assert ex.answer_len == d - 1
        src = ex.answer_start - ex.distance
        assert ex.tokens[src:src + ex.answer_len] == ex.answer
        assert _words(c, ex.tokens)[ex.answer_start - 1] == "|"


def test_grammar_answer_follows_time_word_subject_and_verb() -> None:
    c, rng = _corpus(), np.random.default_rng()
    for d in [2, *rng.integers(6, c.distance_range("grammar")[1], size=20)]:
        ex = c.example("grammar", int(d), rng)
        words = _words(c, ex.tokens)
        time_word = words[ex.answer_start - ex.distance]
        subject = words[ex.answer_start - 1]
        cue = ex.answer_start - ex.distance - 5  # "S like(s) to V ." before the time word
        verb = words[cue + 3]
        assert words[cue] == subject and words[cue + 2] == "to"
        want = {"yesterday": [verb + "ed"], "tomorrow": ["will", verb],
                "today": [verb + "s" if subject in THIRD_PERSON else verb]}[time_word]
        assert _words(c, ex.answer) == want


def test_batch_masks_mark_exactly_the_answers_and_the_real_tokens() -> None:
    c = _corpus()
    batch = c.training_batch(16, int(np.random.default_rng().integers(1 << 30)), 0)
    assert (batch.tokens[~batch.valid] == PAD_ID).all()
    assert not (batch.answer & ~batch.valid).any()
    for row in range(16):
        idx = np.flatnonzero(batch.answer[row])
        assert idx.size >= 1 and np.all(np.diff(idx) == 1)  # one contiguous span
        assert batch.tokens[row, idx[-1] + 1] in c.vocab.encode(". </s>")


def test_tokenizer_json_encodes_to_the_corpus_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab = Vocab()
    vocab.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ex = _corpus().example("grammar", 7, np.random.default_rng())
    text = vocab.decode(ex.tokens[1:-1])
    assert tok(text, add_special_tokens=False)["input_ids"] == list(ex.tokens[1:-1])
    assert tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID


def test_bad_corpus_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="tasks"):
        SyntheticCorpus(seq_len=64, tasks=("sorting",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too short"):
        SyntheticCorpus(seq_len=12)
