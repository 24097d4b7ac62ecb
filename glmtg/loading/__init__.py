"""Files -> config, weights, tokenizer; and models without files (random-weight presets, byte tokenizer)."""

from glmtg.loading.safetensors import load_model
from glmtg.loading.tokenizer import Tokenizer

__all__ = ["Tokenizer", "load_model"]
