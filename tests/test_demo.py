"""The built-in demo and the bundled trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvjax.assets import DEFAULT_MODEL
from kvjax.cache import NoCache
from kvjax.demo import run_demo
from kvjax.models import load_checkpoint, load_tokenizer


def test_bundled_model_matches_transformers() -> None:
    """The shipped checkpoint loads through the Hugging Face path and gives the logits
    ``transformers`` gives for the same files."""
    from transformers import AutoModelForCausalLM

    lm = load_checkpoint(DEFAULT_MODEL)
    tok = load_tokenizer(DEFAULT_MODEL)
    assert tok is not None and lm.config.vocab_size == len(tok.get_vocab())
    sizes = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert sizes < 10 * 2**20  # a small default, as promised
    ids = tok.encode("<s> he likes to paint . tomorrow , in the park , he",
                     add_special_tokens=False)
    assert 1 not in ids  # no <unk>: every word is in the vocabulary
    tokens = np.asarray([ids], np.int32)
    ours, _ = lm.model.apply({"params": lm.params}, tokens,
                             np.arange(len(ids), dtype=np.int32)[None], NoCache())
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-4)


def test_demo_runs_with_every_cache_identical(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(None, 16) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in ("none", "concat", "dense", "paged")]
    assert len(rows) == 8 and all(r.rstrip().endswith("True") for r in rows)
    assert "of 5 right" in out and "[passkey, distance 64]" in out
