"""Block formats of KV caches (planar) and GGUF weights (interleaved blocks): one registry, see registry.py."""

from __future__ import annotations

import torch

from glmtg.formats.gguf_quantize import QUANTIZABLE, quantize_blocks
from glmtg.formats.quant import FP8_MAX, QK
from glmtg.formats.registry import (
    FORMATS,
    GGUF_FORMATS,
    KV_FORMATS,
    REGISTRY,
    BlockFormat,
    KernelCode,
    Layout,
    get,
)

__all__ = ["FORMATS", "FP8_MAX", "GGUF_FORMATS", "KV_FORMATS", "QK", "QUANTIZABLE", "REGISTRY", "BlockFormat",
           "KernelCode", "Layout", "dequantize", "dequantize_blocks", "get", "quantize", "quantize_blocks"]


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, scales or None) of ``x`` [..., D] stored in format ``fmt``."""
    return get(fmt, what="fmt").quantize(x)


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """float32 values [..., D] of rows stored in format ``fmt``."""
    return get(fmt, what="fmt").dequantize(data, scale)


def dequantize_blocks(raw: torch.Tensor, fmt: str | int) -> torch.Tensor:
    """float32 values [..., n_values] of GGUF blocks ``raw`` (uint8 [..., nbytes]) of type ``fmt``, a name
    or a gguf type id; bit-exact with ``gguf.quants.dequantize``."""
    return get(fmt, what="fmt", allowed=GGUF_FORMATS).dequantize_blocks(raw)
