"""The registry of block formats: one frozen record per format in ``REGISTRY``, keyed by name (gguf's type
name, lower case, where gguf has the format) and found by name or by gguf type id (``get``).

A block format stores values in blocks that share one scale (or none). Each record says how many values a
block holds and how many bytes it takes (gguf's ``block_size`` / ``type_size``) and its gguf type id, and
how its bytes are laid out, in one or both of two layouts (``Layout``):

- planar: a tensor of codes and a tensor of scales beside it, as KV caches store them (glmtg/kv_cache.py).
  The record gives the dtypes of codes and scales, the code the kernels branch on, and the torch
  quantize/dequantize that define those bytes (bit-exact with the ``gguf`` package for f16, bf16, q8_0
  and q4_0); ``storage_shape`` and ``row_bytes`` describe the layout.
- blocks: llama.cpp's interleaved blocks, scales and codes of each block together in ``type_size`` raw
  bytes, as GGUF files store weights. The record gives ``dequantize_blocks(raw uint8 [..., nbytes])`` ->
  float32 [..., values], bit-exact with ``gguf.quants.dequantize`` (glmtg/formats/gguf_blocks.py; the grid
  types iq1_s ... iq3_s in gguf_iq.py).

The planar fields of a blocks-only format (the GGUF weight types) are None. ``FORMATS`` is the registry's
planar part (what KV caches and the attention kernels read), ``KV_FORMATS`` and ``GGUF_FORMATS`` name the
formats of KV caches and of GGUF weight tensors.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from glmtg.formats import gguf_blocks, gguf_iq, quant
from glmtg.formats.gguf_blocks import DequantizeBlocks

QK = quant.QK


class Layout(enum.Enum):
    """How a format's bytes sit in memory (see the module docstring)."""

    PLANAR = "planar"  # codes in one tensor, scales in another (KV caches)
    BLOCKS = "blocks"  # gguf's interleaved blocks, uint8 [..., n_blocks * type_size] (weights)


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
    """One block format. Values are quantized along the last dimension of a tensor (a head row, a weight row).

    ``code``, ``data_dtype``, ``scale_dtype``, ``values_per_item``, ``quantize`` and ``dequantize`` describe the
    planar layout (and ``scaled``, ``row_scaled``, ``storage_shape`` ... read them): None for a format without one.
    """

    name: str
    code: KernelCode | None
    # Values sharing one scale; None: one scale per row (fp8), whatever the row's length.
    block_size: int | None
    # Bytes of one block, codes and scale (gguf's type_size); None for row-scaled formats.
    type_size: int | None
    data_dtype: torch.dtype | None
    scale_dtype: torch.dtype | None
    values_per_item: int | None  # values per element of the code tensor (q4_0 packs two per byte)
    gguf_type: int | None  # gguf.GGMLQuantizationType value, where gguf has the format
    quantize: Quantize | None  # float values [..., D] -> (codes, scales or None), as stored
    dequantize: Dequantize | None  # (codes, scales or None) -> float32 values [..., D]
    kv_cache: bool = True  # usable as a KV cache format
    # gguf's interleaved blocks: raw uint8 [..., n * type_size] -> float32 [..., n * block_size]
    dequantize_blocks: DequantizeBlocks | None = None

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """The layouts this format's bytes can take."""
        return tuple(layout for layout, fn in ((Layout.PLANAR, self.dequantize),
                                               (Layout.BLOCKS, self.dequantize_blocks)) if fn is not None)

    def blocks_bytes(self, n_values: int) -> int:
        """Bytes of ``n_values`` values (a weight row) in the blocks layout; ValueError if not whole blocks."""
        if Layout.BLOCKS not in self.layouts:
            raise ValueError(f"format {self.name} has no blocks layout")
        if not isinstance(n_values, int) or n_values < 0 or n_values % self.block_size:
            raise ValueError(f"n_values must be a multiple of {self.block_size} for {self.name}, got {n_values!r}")
        return n_values // self.block_size * self.type_size

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
        if self.values_per_item is None:
            raise ValueError(f"format {self.name} has no planar layout")
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


# Every GGUF weight type decoded: the scalar and k-quant types, then the grid (iq1/iq2/iq3) types.
_BLOCK_TYPES = {**gguf_blocks.BLOCK_TYPES, **gguf_iq.IQ_TYPES}


def _weights_only(name: str) -> BlockFormat:
    """A GGUF weight type: the blocks layout only (no planar fields, not a KV cache format)."""
    gguf_type, block_size, type_size, per_block = _BLOCK_TYPES[name]
    return BlockFormat(name, None, block_size, type_size, None, None, None, gguf_type, None, None,
                       kv_cache=False, dequantize_blocks=gguf_blocks.blockwise(block_size, type_size, per_block))


REGISTRY: dict[str, BlockFormat] = _registry(
    BlockFormat("f16", KernelCode.FLOAT, 1, 2, torch.float16, None, 1, 1,
                quant.cast_to(torch.float16), quant.dequantize_float, dequantize_blocks=gguf_blocks.dequantizer("f16")),
    BlockFormat("bf16", KernelCode.FLOAT, 1, 2, torch.bfloat16, None, 1, 30,
                quant.quantize_bf16, quant.dequantize_float, dequantize_blocks=gguf_blocks.dequantizer("bf16")),
    BlockFormat("q8_0", KernelCode.Q8_0, QK, 2 + QK, torch.int8, torch.float16, 1, 8,
                quant.quantize_q8_0, quant.dequantize_q8_0, dequantize_blocks=gguf_blocks.dequantizer("q8_0")),
    BlockFormat("q4_0", KernelCode.Q4_0, QK, 2 + QK // 2, torch.uint8, torch.float16, 2, 2,
                quant.quantize_q4_0, quant.dequantize_q4_0, dequantize_blocks=gguf_blocks.dequantizer("q4_0")),
    BlockFormat("fp8", KernelCode.FP8, None, None, torch.float8_e4m3fn, torch.float32, 1, None,
                quant.quantize_fp8, quant.dequantize_fp8),
    *(_weights_only(name) for name in _BLOCK_TYPES if name not in ("f16", "bf16", "q8_0", "q4_0")),
)
# The planar formats: those whose codes and scales can sit in two tensors (KV caches).
FORMATS: dict[str, BlockFormat] = {name: f for name, f in REGISTRY.items() if Layout.PLANAR in f.layouts}
KV_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.kv_cache)
# Formats a GGUF tensor can come in (the blocks layout), in gguf type id order.
GGUF_FORMATS: tuple[str, ...] = tuple(sorted((name for name, f in REGISTRY.items() if Layout.BLOCKS in f.layouts),
                                             key=lambda name: REGISTRY[name].gguf_type))
_BY_GGUF_TYPE: dict[int, str] = {f.gguf_type: name for name, f in REGISTRY.items() if f.gguf_type is not None}


def get(key: object, *, what: str = "format", allowed: tuple[str, ...] = KV_FORMATS) -> BlockFormat:
    """The record of format ``key``, a name or a gguf type id (an integer: int, numpy's, gguf's enum);
    ValueError naming ``what`` if it is not one of ``allowed`` (KV cache formats unless told: pass
    ``allowed=GGUF_FORMATS`` for the types of GGUF weight tensors)."""
    name = key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        name = _BY_GGUF_TYPE.get(int(key))
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {key!r}")
    return REGISTRY[name]
