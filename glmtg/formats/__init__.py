"""Block formats (KV caches today, GGUF weights next): one registry, see registry.py."""

from __future__ import annotations

import torch

from glmtg.formats.quant import FP8_MAX, QK
from glmtg.formats.registry import FORMATS, KV_FORMATS, BlockFormat, KernelCode, get

__all__ = ["FORMATS", "FP8_MAX", "KV_FORMATS", "QK", "BlockFormat", "KernelCode", "dequantize", "get", "quantize"]


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, scales or None) of ``x`` [..., D] stored in format ``fmt``."""
    return get(fmt, what="fmt").quantize(x)


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """float32 values [..., D] of rows stored in format ``fmt``."""
    return get(fmt, what="fmt").dequantize(data, scale)
