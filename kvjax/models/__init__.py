"""Decoder models and Hugging Face checkpoint loading."""

from kvjax.models.checkpoint import CheckpointError, LoadedModel, load_checkpoint, load_tokenizer
from kvjax.models.llama import Decoder
from kvjax.models.mla import MLADecoder
from kvjax.models.mla_checkpoint import LoadedMLAModel, load_mla_checkpoint

__all__ = ["CheckpointError", "Decoder", "LoadedMLAModel", "LoadedModel", "MLADecoder",
           "load_checkpoint", "load_mla_checkpoint", "load_tokenizer"]
