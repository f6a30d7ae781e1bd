"""The ``kvjax serve-bench`` config: one YAML file, checked whole before any work.

::

    model:    {preset: tiny, dtype: float32}        # or a preset, e.g. qwen2.5-0.5b
    engine:   {num_blocks: 256, max_batch: 8, prefill_chunk: 32, max_tokens_per_step: 64}
    workload: {num_requests: 48, arrival_rate: 16.0,
               prompt_len: {dist: uniform, min: 8, max: 64},
               output_len: {dist: uniform, min: 8, max: 32}}
    output_dir: runs/serve-bench

Every key must be a field of the dataclass below it (a length distribution takes only
the keys of its ``dist``); an unknown key, a wrong type or a request that cannot fit
the model's context or the pool is a ``ServeBenchConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from kvjax.analysis.presets import get_preset
from kvjax.cache.paged import ATTENTION_BACKENDS
from kvjax.config import ModelConfig
from kvjax.engine.engine import PREEMPTION
from kvjax.engine.workload import DIST_KEYS, LengthDist, WorkloadConfig
from kvjax.memory.host_pool import STAGING
from kvjax.models.fused_decode import FusedLaunch
from kvjax.yaml_config import coerce, read_yaml

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TINY = "tiny"


class ServeBenchConfigError(ValueError):
    """A serve-bench config has an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model served: random weights of a preset's shape, or the tiny built-in one."""

    preset: str = TINY  # "tiny" or a name from kvjax.analysis.presets (e.g. qwen2.5-0.5b)
    num_layers: int = 0  # override the depth (0 = the preset's)
    vocab_size: int = 0  # override the vocabulary (0 = the preset's)
    max_context: int = 0  # override max_position_embeddings (0 = the preset's)
    dtype: str = "float32"  # weights and KV pool
    init_scale: float = 0.02  # standard deviation of the random weights
    seed: int = 0  # of the weights

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("num_layers", "vocab_size", "max_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")

    def model_config(self) -> ModelConfig:
        """The decoder shape: a 2-layer 64-wide Llama for "tiny", else the preset's."""
        if self.preset == TINY:
            cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=64,
                              intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
            cfg = dataclasses.replace(cfg, num_layers=self.num_layers or cfg.num_layers)
        else:
            cfg = get_preset(self.preset).to_model_config(self.num_layers or None)
        return dataclasses.replace(
            cfg, vocab_size=self.vocab_size or cfg.vocab_size,
            max_position_embeddings=self.max_context or cfg.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """``kvjax.engine.engine.Engine`` arguments."""

    num_blocks: int = 256
    block_size: int = 16
    max_batch: int = 8
    prefill_chunk: int = 64
    max_tokens_per_step: int = 0  # 0 = max_batch * prefill_chunk
    prefix_caching: bool = False
    attention: str = "auto"
    decode_steps: int = 1  # decode forwards per step once every request decodes
    preemption: str = "recompute"  # or "swap": victims' K/V wait in a host pool
    swap_blocks: int = 0  # host pool pages for preemption "swap"
    host_staging: str = "pageable"  # swap copies: "pageable", "pinned" or "pinned-slots"
    overlap_bursts: bool = False  # dispatch the next decode burst before reading this one
    fused_decode: bool = False  # decode bursts through the fused Triton layer kernels
    # with fused_decode: each layer piece's kernel settings or "xla" (FusedLaunch), e.g.
    # {down: {split_k: 4}, qkv: xla}
    fused_launch: FusedLaunch = dataclasses.field(default_factory=FusedLaunch)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_batch", "prefill_chunk", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_step and self.max_tokens_per_step < self.max_batch:
            raise ValueError(f"max_tokens_per_step must be >= max_batch ({self.max_batch}) "
                             f"or 0, got {self.max_tokens_per_step}")
        if self.preemption not in PREEMPTION:
            raise ValueError(f"preemption must be one of {PREEMPTION}, got {self.preemption!r}")
        if (self.preemption == "swap") != (self.swap_blocks > 0):
            raise ValueError("swap_blocks must be >= 1 with preemption 'swap' and 0 otherwise, "
                             f"got {self.swap_blocks}")
        if self.host_staging not in STAGING:
            raise ValueError(f"host_staging must be one of {STAGING}, got {self.host_staging!r}")
        if self.fused_launch != FusedLaunch() and not self.fused_decode:
            raise ValueError("fused_launch is only used with fused_decode: true")
        if self.attention not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(f"attention must be auto or one of {ATTENTION_BACKENDS}, got "
                             f"{self.attention!r}")


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    """A whole serve-bench run."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    engine: EngineSpec = dataclasses.field(default_factory=EngineSpec)
    workload: WorkloadConfig = dataclasses.field(default_factory=WorkloadConfig)
    precompile: bool = True  # compile every step shape before the timed replay
    p99_itl_target_ms: float = 0.0  # report whether p99 inter-token latency meets it; 0 = none
    output_dir: str = "runs/serve-bench"


def _build(cls: Any, raw: Any, where: str) -> Any:
    """``cls(**raw)`` with every key known and every value of its field's type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ServeBenchConfigError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    prefix = f"{where}." if where else ""
    names = [f.name for f in dataclasses.fields(cls)]
    allowed = names
    if cls is LengthDist:
        dist = raw.get("dist", "fixed")
        if dist not in DIST_KEYS:
            raise ServeBenchConfigError(f"{prefix}dist must be one of {list(DIST_KEYS)}, "
                                        f"got {dist!r}")
        allowed = ["dist", *DIST_KEYS[dist]]
    for key in raw:
        if key not in allowed:
            raise ServeBenchConfigError(f"unknown key {prefix}{key!s}; allowed: {allowed}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}")
        else:
            values[key] = coerce(f"{prefix}{key}", value, kind, ServeBenchConfigError)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ServeBenchConfigError(f"{where or 'config'}: {err}") from None


def check_fits(cfg: ServeBenchConfig) -> ModelConfig:
    """The model config; raise if the workload's longest request cannot be served."""
    try:
        model_cfg = cfg.model.model_config()
    except (KeyError, ValueError) as err:
        raise ServeBenchConfigError(f"model: {err}") from None
    need = cfg.workload.max_request_tokens
    if need > model_cfg.max_position_embeddings:
        raise ServeBenchConfigError(
            f"workload: the longest request ({need} tokens, prompt + output) exceeds the "
            f"model's context of {model_cfg.max_position_embeddings}")
    blocks = -(-need // cfg.engine.block_size)
    if blocks > cfg.engine.num_blocks:
        raise ServeBenchConfigError(
            f"engine.num_blocks: the longest request needs {blocks} blocks of "
            f"{cfg.engine.block_size} tokens, the pool has {cfg.engine.num_blocks}")
    return model_cfg


def parse_config(raw: Any) -> ServeBenchConfig:
    """Validate a parsed YAML mapping (unknown keys, types, fit); nothing is run."""
    cfg: ServeBenchConfig = _build(ServeBenchConfig, raw, "")
    check_fits(cfg)
    return cfg


def with_overrides(raw: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config mapping ``raw`` with dotted keys set (``engine.num_blocks``,
    ``workload.prompt_len.max``); a missing section is created, a non-mapping on the way
    is an error. The result is checked by ``parse_config`` like any config."""
    out: dict[str, Any] = dict(raw or {})
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ServeBenchConfigError(f"override {dotted}: {key} is not a mapping")
            node[key] = child = dict(child)
            node = child
        node[leaf] = value
    return out


def load_config(path: str | Path, output_dir: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> ServeBenchConfig:
    """Read and validate a YAML config; ``output_dir`` overrides the config's, and
    ``overrides`` (dotted keys, see ``with_overrides``) its entries."""
    raw = read_yaml(path, ServeBenchConfigError)
    cfg = parse_config(with_overrides(raw, overrides or {}))
    return dataclasses.replace(cfg, output_dir=str(output_dir)) if output_dir else cfg
