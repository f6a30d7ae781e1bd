"""Random parameters for a decoder shape (experiments on real architectures, no checkpoint)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.models.checkpoint import param_shapes


def random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int, scale: float = 0.02) -> Any:
    """N(0, scale^2) for every matrix, bias and embedding; RMSNorm weights 1.

    Drawn on the host with NumPy, so nothing is compiled whatever the model's depth and
    the weights are the same on every backend; then placed on the default device in
    ``dtype``. The outputs are meaningless but compute and memory are the real model's.
    """
    return random_tree(param_shapes(cfg), dtype, seed, scale)


def random_tree(shapes: Any, dtype: jnp.dtype, seed: int, scale: float = 0.02) -> Any:
    """:func:`random_params` for any decoder's parameter shapes (a tree of
    ``ShapeDtypeStruct``, e.g. from ``module_param_shapes``): RMSNorm ``weight`` leaves 1,
    every other leaf N(0, scale^2)."""
    rng = np.random.default_rng([seed, 1])
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, spec in flat:
        if path[-1].key == "weight":  # RMSNorm scale
            leaves.append(jnp.ones(spec.shape, dtype))
        else:
            host = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(scale)
            leaves.append(jnp.asarray(host, dtype=dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
