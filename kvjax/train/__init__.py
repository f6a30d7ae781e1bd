"""Training small decoders on the synthetic corpus: the optax loop, evaluation by
distance, Hugging Face checkpoint saving, and attention variants at a matched budget."""

from kvjax.train.checkpoint import save_checkpoint
from kvjax.train.evaluate import evaluate
from kvjax.train.loop import TrainConfig, TrainResult, init_params, model_for, train
from kvjax.train.variants import BaseShape, Variant, build_config, count_params, match_budget

__all__ = ["BaseShape", "TrainConfig", "TrainResult", "Variant", "build_config",
           "count_params", "evaluate", "init_params", "match_budget", "model_for",
           "save_checkpoint", "train"]
