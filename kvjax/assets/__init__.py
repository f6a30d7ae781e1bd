"""Files shipped with the package: the built-in trained model.

``DEFAULT_MODEL`` is a Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, ``tokenizer.json``) of a small GQA decoder trained on CPU on the
synthetic corpus (``kvjax.data``) by ``kvjax run configs/default-model.yaml``; its
evaluation is in ``experiments/default_model/results/``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
