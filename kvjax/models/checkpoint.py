"""Load a local Hugging Face checkpoint (config.json + safetensors + tokenizer).

Only local files are read: nothing is downloaded. Every parameter the model needs
must be present with the right shape, and every tensor in the files must be used;
otherwise the error names the tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from kvjax.cache.none import NoCache
from kvjax.config import ConfigError, ModelConfig
from kvjax.models.llama import Decoder

Params = dict[str, Any]

# Tensors a checkpoint may carry that hold nothing the model needs.
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the config."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its config, the Flax module and its parameters."""

    config: ModelConfig
    model: Decoder
    params: Params
    path: Path


def param_shapes(cfg: ModelConfig) -> Params:
    """Nested dict of ``jax.ShapeDtypeStruct`` for the model's parameters (no allocation)."""
    return module_param_shapes(Decoder(cfg))


def module_param_shapes(model: nn.Module) -> Params:
    """Parameter shapes of any decoder taking ``(tokens, positions, cache)``, traced with
    ``NoCache`` (no allocation)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, NoCache())
    return dict(shapes["params"])


def hf_tensor_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the Hugging Face tensor name."""
    parts = [p.replace("layers_", "layers.") if p.startswith("layers_") else p for p in path]
    leaf = parts[-1]
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts)
    return name if name.startswith("lm_head") else "model." + name


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f.name} listed in the index is missing from {path}")
    return files


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as host arrays (bf16 via ml_dtypes)."""
    tensors: dict[str, np.ndarray] = {}
    for file in _safetensor_files(path):
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = np.asarray(f.get_tensor(name))
    return tensors


def params_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray],
                        dtype: jnp.dtype = jnp.float32) -> Params:
    """Map Hugging Face tensors onto our parameter tree, cast to ``dtype``."""
    return map_tensors(param_shapes(cfg), tensors, dtype,
                       tie_word_embeddings=cfg.tie_word_embeddings)


def map_tensors(expected: Params, tensors: dict[str, np.ndarray], dtype: jnp.dtype, *,
                tie_word_embeddings: bool) -> Params:
    """Fill the parameter tree ``expected`` (``ShapeDtypeStruct`` leaves) from Hugging Face
    tensors, cast to ``dtype``; CheckpointError naming any missing, misshaped or unused
    tensor."""
    unused = set(tensors)
    leaves = []
    flat, treedef = jax.tree_util.tree_flatten_with_path(expected)
    for key_path, spec in flat:
        path = tuple(k.key for k in key_path)
        name = hf_tensor_name(path)
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        array = tensors[name]
        unused.discard(name)
        if path[-1] == "kernel":
            array = array.T
        if array.shape != spec.shape:
            raise CheckpointError(f"tensor {name!r} has shape {array.shape}, "
                                  f"expected {tuple(reversed(spec.shape)) if path[-1] == 'kernel' else spec.shape}")
        leaves.append(jnp.asarray(array, dtype=dtype))
    if tie_word_embeddings:
        unused.discard("lm_head.weight")  # some tied checkpoints store a copy
    unused = {n for n in unused if not n.endswith(_UNUSED_SUFFIXES)}
    if unused:
        raise CheckpointError(f"checkpoint has tensors the model does not use: {sorted(unused)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_checkpoint(path: str | Path, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Load config and weights from a local Hugging Face checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        cfg = ModelConfig.from_hf_dir(path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    params = params_from_tensors(cfg, read_tensors(path), dtype)
    return LoadedModel(config=cfg, model=Decoder(cfg, dtype=dtype), params=params, path=path)


def load_tokenizer(path: str | Path) -> Any | None:
    """The checkpoint's tokenizer via ``transformers.AutoTokenizer`` (local files only),
    or None when the directory holds no tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                               "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
