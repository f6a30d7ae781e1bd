"""Training a decoder (``Decoder`` with any number of K/V heads, or ``MLADecoder``) with optax.

Optimizer: AdamW under a linear warmup then cosine decay to ``final_lr_fraction`` of the
peak, after global-norm gradient clipping. Forwards use ``NoCache`` (the whole sequence
attends to itself causally), positions ``0..T-1`` for every row; right padding then
never influences a real token.

Loss: next-token cross-entropy over every real token of the batch (``Batch.valid``,
padding excluded), answer tokens weighted ``answer_weight`` times (1 = all tokens equal),
a weighted mean. The answer tokens' own mean cross-entropy is reported beside it.
Parameters and compute are float32.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from kvjax.cache import NoCache
from kvjax.config import ModelConfig
from kvjax.data.synthetic import Batch, SyntheticCorpus
from kvjax.mla_config import MLAConfig
from kvjax.models.checkpoint import module_param_shapes
from kvjax.models.llama import Decoder
from kvjax.models.mla import MLADecoder
from kvjax.models.random_init import random_tree

Model = Decoder | MLADecoder
Params = dict[str, Any]


def model_for(cfg: ModelConfig | MLAConfig, dtype: Any = jnp.float32) -> Model:
    """The decoder module of either config (``dtype``: parameters and compute)."""
    return MLADecoder(cfg, dtype) if isinstance(cfg, MLAConfig) else Decoder(cfg, dtype)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer schedule and batch size."""

    steps: int  # optimizer steps
    batch_size: int  # sequences per step
    peak_lr: float = 3e-3  # learning rate after warmup
    warmup_steps: int = 50  # linear warmup from 0
    final_lr_fraction: float = 0.1  # cosine decays to peak_lr * this
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global-norm clip
    answer_weight: float = 1.0  # loss weight of answer tokens relative to the others
    seed: int = 0  # parameter init and the data stream

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("steps and batch_size must be >= 1, warmup_steps >= 0")
        if not (self.peak_lr > 0 and 0 <= self.final_lr_fraction <= 1
                and self.weight_decay >= 0 and self.grad_clip > 0 and self.answer_weight > 0):
            raise ValueError(f"bad optimizer settings: {self}")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Trained parameters and the run's record."""

    params: Params
    history: tuple[dict[str, float], ...]  # {"step", "loss", "answer_loss"} every log step
    seconds: float  # wall time of the steps (compilation included)
    tokens_per_second: float  # real (non-pad) tokens trained on per second


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW with warmup + cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.peak_lr * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def init_params(model: Model, seed: int, scale: float = 0.02) -> Params:
    """float32 N(0, scale^2) weights and embeddings, RMSNorm weights 1, drawn on the host
    (``random_tree``: nothing to compile)."""
    return dict(random_tree(module_param_shapes(model), jnp.float32, seed, scale))


def forward(model: Model, params: Params, tokens: jax.Array) -> jax.Array:
    """Logits of a full-sequence forward: tokens int32 [B, T] -> float32 [B, T, V]."""
    chex.assert_rank(tokens, 2)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model.apply({"params": params}, tokens, positions, NoCache())
    return logits


def token_losses(model: Model, params: Params, tokens: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-target cross-entropy and argmax prediction: tokens [B, T] -> (float32
    [B, T-1], int32 [B, T-1]), entry t scoring token t + 1 from the prefix up to t."""
    logits = forward(model, params, tokens)[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def loss_fn(model: Model, params: Params, tokens: jax.Array, valid: jax.Array,
            answer: jax.Array, answer_weight: float) -> tuple[jax.Array, jax.Array]:
    """(weighted mean loss, answer tokens' mean loss). tokens int32 [B, T]; valid and
    answer bool [B, T] (aligned with tokens)."""
    chex.assert_equal_shape([tokens, valid, answer])
    ce, _ = token_losses(model, params, tokens)
    is_answer = answer[:, 1:].astype(jnp.float32)
    weights = valid[:, 1:].astype(jnp.float32) * (1.0 + (answer_weight - 1.0) * is_answer)
    loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    answer_loss = jnp.sum(ce * is_answer) / jnp.maximum(jnp.sum(is_answer), 1.0)
    return loss, answer_loss


@partial(jax.jit, static_argnames=("model", "opt", "answer_weight"), donate_argnums=(2, 3))
def train_step(model: Model, opt: optax.GradientTransformation, params: Params,
               opt_state: Any, tokens: jax.Array, valid: jax.Array, answer: jax.Array,
               answer_weight: float) -> tuple[Params, Any, jax.Array, jax.Array]:
    """One optimizer step -> (params, opt_state, loss, answer_loss)."""
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    (loss, answer_loss), grads = grad_fn(model, params, tokens, valid, answer, answer_weight)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, answer_loss


def train(model: Model, corpus: SyntheticCorpus, cfg: TrainConfig, *, log_every: int = 10,
          params: Params | None = None) -> TrainResult:
    """Train ``model`` on ``corpus``'s training stream (batch ``i`` is
    ``corpus.training_batch(cfg.batch_size, cfg.seed, i)``), from ``params`` or a fresh
    init. Given ``params`` are copied first: the steps donate their buffers, and the
    caller's arrays (which may be shared with another model's) stay valid."""
    params = init_params(model, cfg.seed) if params is None else jax.tree.map(jnp.copy, params)
    opt = optimizer(cfg)
    opt_state = opt.init(params)
    history = []
    real_tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", leave=False, mininterval=2.0)
    for step in bar:
        batch: Batch = corpus.training_batch(cfg.batch_size, cfg.seed, step)
        real_tokens += int(batch.valid.sum())
        params, opt_state, loss, answer_loss = train_step(
            model, opt, params, opt_state, jnp.asarray(batch.tokens), jnp.asarray(batch.valid),
            jnp.asarray(batch.answer), cfg.answer_weight)
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": float(loss),
                            "answer_loss": float(answer_loss)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}",
                            answer=f"{history[-1]['answer_loss']:.3f}", refresh=False)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return TrainResult(params=params, history=tuple(history), seconds=seconds,
                       tokens_per_second=real_tokens / seconds)
