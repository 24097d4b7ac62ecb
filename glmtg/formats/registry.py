"""The registry of block formats: one frozen record per format, keyed by name.

A block format stores values in blocks that share one scale (or none). Each record says how many values a
block holds and how many bytes it takes (gguf's ``block_size`` / ``type_size``), the dtypes of the stored
codes and scales, the code the kernels branch on, the gguf type id where gguf has the format, and the torch
quantize/dequantize that define its bytes (bit-exact with the ``gguf`` package for f16, bf16, q8_0 and q4_0).

KV caches store formats planar (a tensor of codes and a tensor of scales beside it, see glmtg/kv_cache.py);
``storage_shape`` and ``row_bytes`` describe that layout. Weight formats join this table as new records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch

from glmtg.formats import quant

QK = quant.QK


class KernelCode(enum.IntEnum):
    """Format codes the kernels branch on (Triton constexprs and the CUDA loop's ``enum Format``).

    glmtg/kernels/attention/cuda/decode_quant.cu declares the same values; a CPU test reads it and compares.
    """

    FLOAT = 0  # plain float rows (f16, bf16, or f32 caches the attention kernel reads as the queries' dtype)
    Q8_0 = 1
    Q4_0 = 2
    FP8 = 3


Quantize = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]
Dequantize = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class BlockFormat:
    """One block format. Values are quantized along the last dimension of a tensor (a head row)."""

    name: str
    code: KernelCode
    # Values sharing one scale; None: one scale per row (fp8), whatever the row's length.
    block_size: int | None
    # Bytes of one block, codes and scale (gguf's type_size); None for row-scaled formats.
    type_size: int | None
    data_dtype: torch.dtype
    scale_dtype: torch.dtype | None
    values_per_item: int  # values per element of the code tensor (q4_0 packs two per byte)
    gguf_type: int | None  # gguf.GGMLQuantizationType value, where gguf has the format
    quantize: Quantize  # float values [..., D] -> (codes, scales or None), as stored
    dequantize: Dequantize  # (codes, scales or None) -> float32 values [..., D]
    kv_cache: bool = True  # usable as a KV cache format

    @property
    def scaled(self) -> bool:
        return self.scale_dtype is not None

    @property
    def row_scaled(self) -> bool:
        return self.scaled and self.block_size is None

    def row_error(self, head_dim: int) -> str | None:
        """Why rows of ``head_dim`` values cannot be stored in this format, or None if they can."""
        if self.block_size is not None and head_dim % self.block_size:
            return f"head_dim {head_dim} must be a multiple of {self.block_size} for {self.name}"
        return None

    def data_len(self, head_dim: int) -> int:
        """Elements of the code tensor per row of ``head_dim`` values."""
        return head_dim // self.values_per_item

    def scale_tail(self, head_dim: int) -> tuple[int, ...] | None:
        """Trailing shape of the scale tensor per row: (blocks,), () for one scale per row, None if unscaled."""
        if not self.scaled:
            return None
        return () if self.block_size is None else (head_dim // self.block_size,)

    def storage_shape(self, pages: int, num_kv_heads: int, tokens: int, head_dim: int
                      ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...] | None, torch.dtype | None]:
        """(data shape, data dtype, scale shape or None, scale dtype or None) of one K or V store."""
        lead = (pages, num_kv_heads, tokens)
        tail = self.scale_tail(head_dim)
        return ((*lead, self.data_len(head_dim)), self.data_dtype,
                None if tail is None else (*lead, *tail), self.scale_dtype)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one (token, head) row of ``head_dim`` values, scales included."""
        n = self.data_len(head_dim) * self.data_dtype.itemsize
        tail = self.scale_tail(head_dim)
        if tail is not None:
            n += (tail[0] if tail else 1) * self.scale_dtype.itemsize
        return n


def _registry(*formats: BlockFormat) -> dict[str, BlockFormat]:
    table = {f.name: f for f in formats}
    if len(table) != len(formats):
        raise ValueError("format names must be unique")
    return table


FORMATS: dict[str, BlockFormat] = _registry(
    BlockFormat("f16", KernelCode.FLOAT, 1, 2, torch.float16, None, 1, 1,
                quant.cast_to(torch.float16), quant.dequantize_float),
    BlockFormat("bf16", KernelCode.FLOAT, 1, 2, torch.bfloat16, None, 1, 30,
                quant.quantize_bf16, quant.dequantize_float),
    BlockFormat("q8_0", KernelCode.Q8_0, QK, 2 + QK, torch.int8, torch.float16, 1, 8,
                quant.quantize_q8_0, quant.dequantize_q8_0),
    BlockFormat("q4_0", KernelCode.Q4_0, QK, 2 + QK // 2, torch.uint8, torch.float16, 2, 2,
                quant.quantize_q4_0, quant.dequantize_q4_0),
    BlockFormat("fp8", KernelCode.FP8, None, None, torch.float8_e4m3fn, torch.float32, 1, None,
                quant.quantize_fp8, quant.dequantize_fp8),
)
KV_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.kv_cache)


def get(name: object, *, what: str = "format", allowed: tuple[str, ...] = KV_FORMATS) -> BlockFormat:
    """The record of format ``name``; ValueError naming ``what`` if it is not one of ``allowed``."""
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {name!r}")
    return FORMATS[name]
