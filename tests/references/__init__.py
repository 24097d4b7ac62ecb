"""Shared references of the tests: float64 attention, bit-exact quantization (gguf), transformers model."""
