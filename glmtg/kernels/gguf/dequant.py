"""Whole rows of GGUF blocks -> a float tensor on the device, by the same block decoders the GEMV and MoE
kernels use (``decode.decode_blocks``).

For the paths that need a float tile to feed a matmul (prefill, a chunk of rows at a time, never the whole
model) and for checking the decoders on the device against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.formats import GGUF_FORMATS, get
from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.decode import DECODED, decode_blocks
from glmtg.kernels.gguf.tables import lookup_table

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequant_rows_kernel(W, Out, Aux, N, NB, ROW_BYTES, FMT: tl.constexpr, BS: tl.constexpr,
                         TS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (r < N)[:, None] & (g < NB)[None, :]
    blk = W + r.to(tl.int64)[:, None] * ROW_BYTES + (g * TS)[None, :]
    v = decode_blocks(blk, mask, Aux, FMT, BS)  # [R, G, BS]
    j = tl.arange(0, BS)
    offs = r.to(tl.int64)[:, None, None] * (NB * BS) + (g * BS)[None, :, None] + j[None, None, :]
    tl.store(Out + offs, v.to(Out.dtype.element_ty), mask=mask[:, :, None])


def dequantize_rows(raw: torch.Tensor, fmt: str | int, *, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """raw uint8 [..., row_bytes] (rows of GGUF blocks of ``fmt``, a name or gguf type id) -> values
    [..., row_bytes / type_size * block_size] in ``dtype`` (fp32 values are bit-exact with gguf's)."""
    f = get(fmt, what="fmt", allowed=GGUF_FORMATS)
    check(f.name in DECODED, lambda: f"no device decoder for {f.name} yet (decoded: {DECODED})")
    check(isinstance(raw, torch.Tensor) and raw.dtype == torch.uint8 and raw.dim() >= 1,
          lambda: f"raw must be a uint8 tensor [..., row_bytes], got {describe(raw)}")
    check(raw.is_contiguous(), lambda: f"raw must be contiguous, strides {raw.stride()}")
    row_bytes = raw.shape[-1]
    check(row_bytes % f.type_size == 0,
          lambda: f"row_bytes {row_bytes} is not a whole number of {f.name} blocks of {f.type_size} bytes")
    check(raw.data_ptr() % 16 == 0, "raw must start 16-byte aligned (a GGUF tensor always does)")
    check(dtype in OUT_DTYPES, lambda: f"dtype must be one of {OUT_DTYPES}, got {dtype}")
    nb = row_bytes // f.type_size
    shape = (*raw.shape[:-1], nb * f.block_size)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    else:
        check(isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == dtype
              and out.device == raw.device and out.is_contiguous(),
              lambda: f"out must be a contiguous {dtype} tensor {shape} on {raw.device}, got {describe(out)}")
    n = raw.numel() // row_bytes if row_bytes else 0
    if n == 0 or nb == 0:
        return out
    block_g = max(1, min(triton.next_power_of_2(nb), 1024 // f.block_size))
    block_r = 4
    aux = lookup_table(f.name, raw.device)
    grid = (triton.cdiv(n, block_r), triton.cdiv(nb, block_g))
    _dequant_rows_kernel[grid](raw, out, aux, n, nb, row_bytes, FMT=f.gguf_type, BS=f.block_size,
                               TS=f.type_size, BLOCK_R=block_r, BLOCK_G=block_g)
    return out
