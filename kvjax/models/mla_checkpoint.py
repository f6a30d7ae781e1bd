"""Load a local DeepSeek-V2 / DeepSeek-V3 checkpoint (dense MLP layers) as an MLA model.

The same files and the same rules as :mod:`kvjax.models.checkpoint`: every parameter
must be present with the right shape, every tensor must be used, and errors name the
tensor (or, for the config, the field).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from kvjax.config import ConfigError
from kvjax.mla_config import MLAConfig
from kvjax.models.checkpoint import (
    CheckpointError,
    Params,
    map_tensors,
    module_param_shapes,
    read_tensors,
)
from kvjax.models.mla import MLADecoder, MLAPath


@dataclasses.dataclass(frozen=True)
class LoadedMLAModel:
    """An MLA model ready to run: its config, the Flax module and its parameters."""

    config: MLAConfig
    model: MLADecoder
    params: Params
    path: Path


def load_mla_checkpoint(path: str | Path, dtype: jnp.dtype = jnp.float32,
                        attention: MLAPath = "absorbed") -> LoadedMLAModel:
    """Load config and weights; ``attention`` is the model's path ("naive" / "absorbed")."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        cfg = MLAConfig.from_hf_dir(path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    model = MLADecoder(cfg, dtype=dtype, attention=attention)
    params = map_tensors(module_param_shapes(model), read_tensors(path), dtype,
                         tie_word_embeddings=cfg.tie_word_embeddings)
    return LoadedMLAModel(config=cfg, model=model, params=params, path=path)
