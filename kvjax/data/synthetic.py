"""A seeded generator of token sequences whose answers need the KV cache.

Four tasks, each an :class:`Example` with one contiguous answer span and its *distance*:
the number of positions from the token the answer must be read from (or is decided by)
to the answer's first token.

* ``passkey``: ``<s> filler the pass key is 7 1 9 4 . filler what is the pass key ? 7 1 9 4
  </s>``; distance from the first key digit to the first answer digit.
* ``kv_recall``: ``<s> filler apple : 4 7 , river : 0 3 , ... filler what is river ? 0 3
  </s>``; distance from the queried value's first digit to the answer's.
* ``copy``: ``<s> filler copy : w1 .. ws | w1 .. ws </s>``; distance ``s + 1`` (from each
  word to its copy).
* ``grammar``: ``<s> [sentences] he likes to paint . tomorrow , in the park , he will paint
  . </s>``; the answer is the verb form (``painted`` / ``paint(s)`` / ``will paint``), set by
  the cue's verb, the time word and the subject; distance from the time word. Earlier
  sentences of the same kind fill the sequence and are not answers.

Passkey, key->value and copy fill the sequence before the task with filler words, so
their examples are exactly ``seq_len`` tokens; grammar examples are right-padded with
``<pad>``. A distance is exact, not approximate: the builders place filler (or choose the
span length / the phrases) to hit it, and raise ValueError for one the task cannot make
within ``seq_len``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from kvjax.data.vocab import (
    BOS_ID,
    DIGITS,
    EOS_ID,
    FILLER_SENTENCES,
    NOUNS,
    PAD_ID,
    PHRASES,
    SUBJECTS,
    THIRD_PERSON,
    TIME_WORDS,
    VERBS,
    Vocab,
)

Task = Literal["passkey", "kv_recall", "copy", "grammar"]
TASKS: tuple[Task, ...] = ("passkey", "kv_recall", "copy", "grammar")

_PASSKEY_HEADER = "the pass key is".split()
_PASSKEY_QUESTION = "what is the pass key ?".split()
_FILLER = " ".join(FILLER_SENTENCES).split()


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence: ``tokens`` from ``<s>`` to ``</s>``, no padding."""

    task: Task
    tokens: tuple[int, ...]
    answer_start: int  # index in tokens of the first answer token
    answer_len: int  # answer tokens (contiguous)
    distance: int  # positions from the answer's source token to answer_start

    @property
    def answer(self) -> tuple[int, ...]:
        """The answer's token ids."""
        return self.tokens[self.answer_start:self.answer_start + self.answer_len]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Examples padded to a common length T (host arrays)."""

    tokens: np.ndarray  # int32 [B, T]; <pad> after </s>
    valid: np.ndarray  # bool [B, T]; True on the example's own tokens
    answer: np.ndarray  # bool [B, T]; True on answer tokens
    distance: np.ndarray  # int32 [B]; each example's distance
    task: np.ndarray  # int32 [B]; index into TASKS


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
    """The task mix and sizes; every batch is a function of ``(seed, step)`` alone."""

    seq_len: int  # tokens per sequence (T)
    tasks: tuple[Task, ...] = TASKS  # tasks drawn, uniformly, for training batches
    max_distance: int = 0  # cap on training distances (0 = as far as seq_len allows)
    passkey_digits: int = 4  # digits of a passkey
    value_digits: int = 2  # digits of a key->value value
    kv_pairs: int = 4  # key->value pairs per example (at most len(NOUNS))
    vocab: Vocab = dataclasses.field(default_factory=Vocab)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if not 1 <= self.kv_pairs <= len(NOUNS):
            raise ValueError(f"kv_pairs must be in [1, {len(NOUNS)}], got {self.kv_pairs}")
        if self.passkey_digits < 1 or self.value_digits < 1 or self.max_distance < 0:
            raise ValueError("passkey_digits and value_digits must be >= 1, max_distance >= 0")
        for task in self.tasks:
            if self.distance_range(task)[1] < self.distance_range(task)[0]:
                raise ValueError(f"seq_len={self.seq_len} is too short for task {task!r}")

    @property
    def _pair_len(self) -> int:
        return 3 + self.value_digits  # "key : d .. d ,"

    def distance_range(self, task: Task) -> tuple[int, int]:
        """Least and greatest distance of ``task`` within ``seq_len`` (not capped by
        ``max_distance``). Grammar cannot make distances 3 to 5."""
        room = self.seq_len - 1  # after <s>
        if task == "passkey":
            n = self.passkey_digits
            return n + 7, room - n - 5
        if task == "kv_recall":
            p = self._pair_len
            return p + 2, room - 3 - self.value_digits - (self.kv_pairs - 1) * p
        if task == "copy":
            return 2, (room - 2) // 2
        if task == "grammar":
            return 2, room - 9
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")

    def feasible(self, task: Task, distance: int) -> bool:
        """Whether ``task`` can make an example at exactly ``distance``."""
        lo, hi = self.distance_range(task)
        return lo <= distance <= hi and not (task == "grammar" and 3 <= distance <= 5)

    def example(self, task: Task, distance: int, rng: np.random.Generator) -> Example:
        """One example of ``task`` at exactly ``distance`` (ValueError if not feasible)."""
        if not self.feasible(task, distance):
            raise ValueError(f"task {task!r} cannot make distance {distance} within "
                             f"seq_len={self.seq_len} (range {self.distance_range(task)})")
        words, answer_at, answer_len = _BUILDERS[task](self, distance, rng)
        if task == "grammar":
            prefix = _grammar_prefix(rng, self.seq_len - 2 - len(words))
        else:
            prefix = _filler(rng, self.seq_len - 2 - len(words))
        tokens = (BOS_ID, *self.vocab.encode(" ".join([*prefix, *words])), EOS_ID)
        return Example(task=task, tokens=tokens, answer_start=1 + len(prefix) + answer_at,
                       answer_len=answer_len, distance=distance)

    def training_batch(self, batch_size: int, seed: int, step: int) -> Batch:
        """Batch ``step`` of the training stream: each row a task drawn uniformly from
        ``tasks`` at a distance drawn uniformly from its feasible range (capped by
        ``max_distance``)."""
        rng = np.random.default_rng([seed, step])
        examples = []
        for _ in range(batch_size):
            task = self.tasks[int(rng.integers(len(self.tasks)))]
            lo, hi = self.distance_range(task)
            hi = min(hi, self.max_distance) if self.max_distance else hi
            distance = int(rng.integers(lo, max(lo, hi) + 1))
            while not self.feasible(task, distance):
                distance = int(rng.integers(lo, max(lo, hi) + 1))
            examples.append(self.example(task, distance, rng))
        return collate(examples, self.seq_len)

    def eval_examples(self, distances: Sequence[int], per_distance: int, seed: int
                      ) -> list[Example]:
        """``per_distance`` examples of every task in ``tasks`` at every feasible distance
        in ``distances`` (infeasible (task, distance) pairs are skipped)."""
        rng = np.random.default_rng([seed, 1 << 30])
        return [self.example(task, d, rng) for task in self.tasks for d in distances
                if self.feasible(task, d) for _ in range(per_distance)]


def collate(examples: Sequence[Example], seq_len: int) -> Batch:
    """Right-pad examples to ``seq_len`` and stack them."""
    b = len(examples)
    tokens = np.full((b, seq_len), PAD_ID, np.int32)
    valid = np.zeros((b, seq_len), bool)
    answer = np.zeros((b, seq_len), bool)
    for i, ex in enumerate(examples):
        if len(ex.tokens) > seq_len:
            raise ValueError(f"example of {len(ex.tokens)} tokens exceeds seq_len={seq_len}")
        tokens[i, :len(ex.tokens)] = ex.tokens
        valid[i, :len(ex.tokens)] = True
        answer[i, ex.answer_start:ex.answer_start + ex.answer_len] = True
    return Batch(tokens=tokens, valid=valid, answer=answer,
                 distance=np.asarray([ex.distance for ex in examples], np.int32),
                 task=np.asarray([TASKS.index(ex.task) for ex in examples], np.int32))


def _filler(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` filler words: the filler sentences from a random point, cyclically."""
    start = int(rng.integers(len(_FILLER)))
    return [_FILLER[(start + i) % len(_FILLER)] for i in range(n)]


def _digits(rng: np.random.Generator, n: int) -> list[str]:
    return [DIGITS[int(d)] for d in rng.integers(0, 10, n)]


# Each builder returns (words after the prefix, answer index in them, answer length).
Built = tuple[list[str], int, int]


def _passkey(c: SyntheticCorpus, distance: int, rng: np.random.Generator) -> Built:
    """distance = digits + 1 (".") + gap + 6 (the question)."""
    key = _digits(rng, c.passkey_digits)
    gap = distance - c.passkey_digits - 7
    words = [*_PASSKEY_HEADER, *key, ".", *_filler(rng, gap), *_PASSKEY_QUESTION]
    return [*words, *key], len(words), len(key)


def _kv_recall(c: SyntheticCorpus, distance: int, rng: np.random.Generator) -> Built:
    """Pair ``i`` of ``n`` queried after ``gap`` filler words: distance = (n - i) * P + 2 +
    gap, P the pair length; ``i`` is drawn among those that fit ``seq_len``."""
    n, p, room = c.kv_pairs, c._pair_len, c.seq_len - 1
    lowest = max(0, n - (distance - 2) // p)
    highest = min(n - 1, (room - 3 - c.value_digits - distance) // p)
    queried = int(rng.integers(lowest, highest + 1))
    keys = [NOUNS[int(k)] for k in rng.choice(len(NOUNS), n, replace=False)]
    values = [_digits(rng, c.value_digits) for _ in range(n)]
    words = [w for k, v in zip(keys, values, strict=True) for w in (k, ":", *v, ",")]
    gap = distance - (n - queried) * p - 2
    words += [*_filler(rng, gap), "what", "is", keys[queried], "?"]
    return [*words, *values[queried]], len(words), c.value_digits


def _copy(c: SyntheticCorpus, distance: int, rng: np.random.Generator) -> Built:
    """A span of ``distance - 1`` words (nouns and digits), a separator, the span again."""
    pool = NOUNS + DIGITS
    span = [pool[int(i)] for i in rng.integers(0, len(pool), distance - 1)]
    words = ["copy", ":", *span, "|"]
    return [*words, *span], len(words), len(span)


def _verb_form(time: str, subject: str, verb: str) -> list[str]:
    """The verb phrase ``time`` and ``subject`` call for: worked / work(s) / will work."""
    if time == "yesterday":
        return [verb + "ed"]
    if time == "tomorrow":
        return ["will", verb]
    return [verb + "s" if subject in THIRD_PERSON else verb]


def _phrases(rng: np.random.Generator, n: int) -> list[str]:
    """Prepositional phrases (2 or 3 words each) totalling exactly ``n >= 2`` words."""
    by_len = {k: [p.split() for p in PHRASES if len(p.split()) == k] for k in (2, 3)}
    words: list[str] = []
    while n:
        options = [k for k in (2, 3) if n - k == 0 or n - k >= 2]
        k = options[int(rng.integers(len(options)))]
        words += by_len[k][int(rng.integers(len(by_len[k])))]
        n -= k
    return words


def _grammar_sentence(distance: int, rng: np.random.Generator) -> Built:
    """``S like(s) to V . T [, phrases ,] S form .``; distance from T to the form: 2, or
    ``len(phrases) + 4`` (at least 6) with the phrases."""
    subject = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
    verb = VERBS[int(rng.integers(len(VERBS)))]
    time = TIME_WORDS[int(rng.integers(len(TIME_WORDS)))]
    like = "likes" if subject in THIRD_PERSON else "like"
    middle = [] if distance == 2 else [",", *_phrases(rng, distance - 4), ","]
    words = [subject, like, "to", verb, ".", time, *middle, subject]
    form = _verb_form(time, subject, verb)
    return [*words, *form, "."], len(words), len(form)


def _grammar(c: SyntheticCorpus, distance: int, rng: np.random.Generator) -> Built:
    del c
    return _grammar_sentence(distance, rng)


def _grammar_prefix(rng: np.random.Generator, room: int) -> list[str]:
    """Whole grammar sentences (distance 2 or 6..9) while they fit in ``room`` words."""
    words: list[str] = []
    while True:
        distance = int(rng.choice([2, 6, 7, 8, 9]))
        sentence = _grammar_sentence(distance, rng)[0]
        if len(words) + len(sentence) > room:
            return words
        words += sentence


_BUILDERS = {"passkey": _passkey, "kv_recall": _kv_recall, "copy": _copy, "grammar": _grammar}
