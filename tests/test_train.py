"""Training loop, evaluation, checkpoint round trip, matched parameter budget, sweep params."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from kvjax import runner
from kvjax.analysis.sizing import kv_bytes, max_batch, weight_bytes
from kvjax.analysis.spec import ArchSpec
from kvjax.data import SyntheticCorpus
from kvjax.data.synthetic import Example
from kvjax.data.vocab import BOS_ID, EOS_ID
from kvjax.models import Decoder, MLADecoder, load_checkpoint, load_mla_checkpoint, load_tokenizer
from kvjax.train import (
    BaseShape,
    TrainConfig,
    Variant,
    build_config,
    count_params,
    evaluate,
    init_params,
    match_budget,
    save_checkpoint,
    train,
)
from kvjax.train.loop import forward

SHAPE = BaseShape(vocab_size=SyntheticCorpus(seq_len=64).vocab.size, hidden_size=32,
                  num_layers=2, num_heads=4, head_dim=8, intermediate_size=64,
                  max_position_embeddings=64, mla_rope_head_dim=4)


def test_training_loss_decreases_on_the_copy_task() -> None:
    corpus = SyntheticCorpus(seq_len=48, tasks=("copy",), max_distance=8)
    model = Decoder(build_config(Variant.parse("gqa-2", 4), SHAPE, 64))
    seed = int(np.random.default_rng().integers(1 << 20))
    result = train(model, corpus, TrainConfig(steps=30, batch_size=8, warmup_steps=5,
                                              peak_lr=1e-2, seed=seed), log_every=1)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    # From ~ln(V) at init to well below it: a real decrease, not noise.
    assert losses[0] > 0.9 * np.log(corpus.vocab.size)
    assert np.mean(losses[-5:]) < 0.75 * losses[0]


def test_training_from_given_params_leaves_them_intact() -> None:
    corpus = SyntheticCorpus(seq_len=48, tasks=("copy",), max_distance=8)
    model = Decoder(build_config(Variant.parse("mqa", 4), SHAPE, 64))
    start = init_params(model, seed=int(np.random.default_rng().integers(1 << 20)))
    snapshot = jax.tree.map(np.array, start)
    result = train(model, corpus, TrainConfig(steps=3, batch_size=4, warmup_steps=1),
                   params=start)
    # the caller's arrays are still readable and unchanged; the result moved away from them
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, start), snapshot)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                         result.params, snapshot))
    assert any(moved)


def _two_answer_examples(corpus: SyntheticCorpus) -> list[Example]:
    rng = np.random.default_rng()
    return [corpus.example("passkey", 20, rng), corpus.example("copy", 5, rng)]


def test_evaluate_scores_exact_match_from_argmax() -> None:
    """A model whose logits are forced to one token is right exactly where every answer
    token is that token."""
    corpus = SyntheticCorpus(seq_len=48, tasks=("copy",))
    model = Decoder(build_config(Variant.parse("mha", 4), SHAPE, 64))
    params = init_params(model, seed=0)
    ex = _two_answer_examples(corpus)
    params["lm_head"] = {"kernel": jnp.zeros_like(params["lm_head"]["kernel"])}
    only = ex[0].answer[0]
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, only].set(1.0)
    params["norm"] = {"weight": jnp.ones_like(params["norm"]["weight"]) * 50.0}
    res = evaluate(model, params, ex, 48, batch_size=4)
    want = [all(t == only for t in e.answer) for e in ex]
    got = [r["accuracy"] == 1.0 for r in res["by_distance"]]
    assert sorted(got) == sorted(want) and res["loss"] > 0
    assert [r["distance"] for r in res["by_distance"]] == [20, 5]


@pytest.mark.parametrize("variant", ["gqa-2", "mla-8"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path: Path, variant: str) -> None:
    corpus = SyntheticCorpus(seq_len=48)
    cfg = build_config(Variant.parse(variant, 4), SHAPE, 64)
    model = MLADecoder(cfg) if variant.startswith("mla") else Decoder(cfg)
    params = init_params(model, seed=int(np.random.default_rng().integers(1 << 20)), scale=0.2)
    save_checkpoint(tmp_path, cfg, params, corpus.vocab)
    loaded = (load_mla_checkpoint(tmp_path) if variant.startswith("mla")
              else load_checkpoint(tmp_path))
    assert type(loaded.model) is type(model)
    tokens = jnp.asarray(corpus.training_batch(2, 0, 0).tokens)
    np.testing.assert_array_equal(np.asarray(forward(model, params, tokens)),
                                  np.asarray(forward(loaded.model, loaded.params, tokens)))
    assert loaded.config == dataclasses.replace(cfg, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))
    tok = load_tokenizer(tmp_path)
    assert tok is not None and tok.vocab_size == corpus.vocab.size


@pytest.mark.parametrize("name", ["mha", "gqa-2", "mqa", "mla-8", "mla-16"])
def test_matched_budget_is_within_tolerance_and_nearest(name: str) -> None:
    variant = Variant.parse(name, 4)
    target = count_params(build_config(Variant.parse("mha", 4), SHAPE, 64))
    cfg = match_budget(variant, SHAPE, target, tolerance=0.03)
    got = count_params(cfg)
    assert abs(got - target) / target <= 0.03
    # No other width is nearer the target.
    for width in (cfg.intermediate_size - 1, cfg.intermediate_size + 1):
        other = count_params(build_config(variant, SHAPE, width))
        assert abs(other - target) >= abs(got - target)
    # The counter agrees with the parameters the model really has.
    model = MLADecoder(cfg) if name.startswith("mla") else Decoder(cfg)
    leaves = jax.tree_util.tree_leaves(init_params(model, seed=0))
    assert sum(x.size for x in leaves) == got


def test_matched_budget_rejects_an_unreachable_target() -> None:
    with pytest.raises(ValueError, match="from the target"):
        match_budget(Variant.parse("mha", 4), SHAPE, 1000)
    with pytest.raises(ValueError, match="unknown variant"):
        Variant.parse("gqa", 4)
    with pytest.raises(ValueError, match="must divide"):
        Variant.parse("gqa-3", 4)


def test_max_batch_is_the_largest_batch_that_fits() -> None:
    spec = ArchSpec.from_config(build_config(Variant.parse("gqa-2", 4), SHAPE, 64), "t")
    budget = weight_bytes(spec, "bf16") + int(np.random.default_rng().integers(1, 10**7))
    b = max_batch(spec, "bf16", "bf16", budget, 100)
    assert weight_bytes(spec, "bf16") + kv_bytes(spec, "bf16", b, 100) <= budget
    assert weight_bytes(spec, "bf16") + kv_bytes(spec, "bf16", b + 1, 100) > budget
    assert max_batch(spec, "bf16", "bf16", 10, 100) == 0


@pytest.mark.parametrize(("params", "match"), [
    ({"variants": ["mha", "gqa-3"]}, "gqa-3"),
    ({"variants": ["gqa-2"], "conversions": ["mqa"]}, "add 'mha'"),
    ({"conversions": ["mha"]}, "shrink"),
    ({"tasks": ["sorting"]}, "sorting"),
    ({"steps": 0}, "steps"),
    ({"seq_len": 16}, "too short"),
    ({"decode_prompt_len": 100, "decode_new_tokens": 100}, "seq_len"),
    ({"kv_dtype": "fp7"}, "fp7"),
    ({"budget_tolerance": 0.0, "mlp_multiple": 64}, "tolerance"),
    ({"conversions": ["mla-4096"]}, "full rank"),
    ({"finetune_steps": -1}, "finetune_steps"),
])
def test_runner_rejects_bad_sweep_params_before_work(tmp_path: Path, params: dict,
                                                     match: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "attention-sweep", "params": params}))
    out = tmp_path / "out"
    with pytest.raises(runner.ExperimentConfigError, match=match):
        runner.load(path, out)
    assert not out.exists()
