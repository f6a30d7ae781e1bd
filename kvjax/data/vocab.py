"""The fixed word list of the synthetic corpus and its word-level tokenizer.

Ids are positions in :data:`WORDS`: the four special tokens first (``<pad>`` = 0,
``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3), then every word the task templates use. The
same vocabulary is written out as a ``tokenizers`` WordLevel ``tokenizer.json`` (split on
whitespace), so a saved checkpoint's tokenizer encodes text to the ids training used.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIALS))
DIGITS = tuple(str(d) for d in range(10))
# Passkey / key-value / copy structure.
MARKERS = ("the", "pass", "key", "is", "what", "?", ".", ",", ":", ";", "|", "copy")
# Haystack filler (the passkey-retrieval sentences of Mohtashami & Jaggi, 2023).
FILLER_SENTENCES = (
    "the grass is green .", "the sky is blue .", "the sun is yellow .", "here we go .",
    "there and back again .",
)
# Keys of the key->value task (and words of copied spans).
NOUNS = (
    "apple", "river", "house", "table", "garden", "window", "mountain", "forest", "city", "bird",
    "horse", "ocean", "cloud", "stone", "bridge", "lamp", "book", "door", "road", "tree",
    "flower", "train", "ship", "clock", "chair", "cup", "box", "field", "hill", "lake", "star",
    "moon",
)
# Grammar: time words set the tense, the subject sets the third-person -s.
TIME_WORDS = ("yesterday", "today", "tomorrow")
SUBJECTS = ("I", "you", "he", "she", "we", "they")
THIRD_PERSON = frozenset({"he", "she"})
VERBS = ("work", "play", "walk", "cook", "help", "talk", "jump", "clean", "paint", "call",
         "wash", "open")
PHRASES = ("in the park", "at home", "with my friend", "in the morning", "at school",
           "in the evening", "on the hill", "by the lake")
GRAMMAR_WORDS = ("like", "likes", "to", "will", "in", "at", "with", "my", "friend", "park",
                 "home", "morning", "school", "evening", "on", "by")


def _ordered_unique(groups: Sequence[Sequence[str]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for word in group:
            seen.setdefault(word, None)
    return tuple(seen)


WORDS: tuple[str, ...] = _ordered_unique([
    SPECIALS, DIGITS, MARKERS, " ".join(FILLER_SENTENCES).split(), NOUNS, TIME_WORDS, SUBJECTS,
    VERBS, [v + "s" for v in VERBS], [v + "ed" for v in VERBS], GRAMMAR_WORDS,
])


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Word <-> id maps over :data:`WORDS`."""

    words: tuple[str, ...] = WORDS

    def __post_init__(self) -> None:
        if self.words[:len(SPECIALS)] != SPECIALS or len(set(self.words)) != len(self.words):
            raise ValueError("a vocabulary starts with the special tokens and has no duplicates")

    @property
    def size(self) -> int:
        """Number of ids."""
        return len(self.words)

    @functools.cached_property
    def ids(self) -> dict[str, int]:
        """Word -> id."""
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        """Whitespace-split ``text`` -> ids (KeyError naming an unknown word)."""
        ids = self.ids
        return [ids[w] for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> the words joined by spaces."""
        return " ".join(self.words[i] for i in ids)

    def tokenizer(self) -> Any:
        """A ``tokenizers.Tokenizer`` (WordLevel, whitespace split) with these ids."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=self.ids, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        return tok

    def save_tokenizer(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (a
        ``PreTrainedTokenizerFast`` with pad/unk/bos/eos set) into the directory ``path``."""
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer(), pad_token="<pad>",
                                       unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.save_pretrained(str(path))
