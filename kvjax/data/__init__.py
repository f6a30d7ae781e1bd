"""Synthetic training and evaluation data: a word-level vocabulary and tasks that need the
KV cache (passkey retrieval, key->value recall, copying, grammar)."""

from kvjax.data.synthetic import TASKS, Batch, Example, SyntheticCorpus, Task
from kvjax.data.vocab import Vocab

__all__ = ["TASKS", "Batch", "Example", "SyntheticCorpus", "Task", "Vocab"]
