"""Quantize float weights into GGUF blocks with torch, on any device: ``quantize_blocks(values, fmt)``.

What it is for: random-weight models of any preset turned into any quant mix directly on the GPU, so a
quantized model can be compared (KL-divergence) with the bf16 model of the same weights.

- f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1: bit-exact with ``gguf.quants.quantize`` (numpy): the same
  float32 operations in the same order, each correctly rounded on CPU and CUDA alike (see ``div``), the
  same rounding of codes (q8_0: round half away from zero; the others: truncation of x * id + 8.5 / 16.5 /
  0.5), the first value of largest magnitude where gguf takes it (argmax). bf16 rounds to nearest even on
  the bits with NaN made quiet, as gguf does; f16 is a round-to-nearest-even cast and keeps the sign and
  top 10 payload bits of a NaN (signalling ones too), as numpy does. Where gguf's own result is undefined:
  blocks so tiny that 1/d overflows float32 (amax below ~4e-37) or holding NaN/Inf get clamped codes here,
  and a zero min or max of a q4_1/q5_1 block is +0 here (numpy returns -0 or +0 depending on the memory
  layout).
- q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs: valid blocks from a min/max quantizer with a stated error
  bound, not llama.cpp's error-minimising search (gguf_quantize_k.py says how and why; KL-divergences
  measured on them reflect this quantizer).

Work is vectorised over blocks and done in chunks of rows (about ``CHUNK_VALUES`` values each) so that the
float32 temporaries stay within a few hundred MB whatever the tensor's size.
"""

from __future__ import annotations

import torch

from glmtg.formats.gguf_quantize_k import (
    K_QUANTIZERS,
    BlockQuantizer,
    div,
    f16_bytes,
    inverse,
    pack_bits,
    signed_max,
)
from glmtg.formats.registry import REGISTRY, get

# Values per chunk: 8M float32 values is 32 MB per temporary; the quantizers hold about ten at once.
CHUNK_VALUES = 1 << 23
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- float types -----------------------------------------------------------------------------------------

def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Round to nearest even; a NaN keeps its sign and top 10 payload bits (at least one set, to stay a NaN),
    as numpy's float16 cast does (torch's cast writes one canonical NaN)."""
    h = b.to(torch.float16).view(torch.int16).to(torch.int32)
    bits = b.view(torch.int32)
    payload = (bits >> 13) & 0x03FF
    nan = ((bits >> 16) & 0x8000) | 0x7C00 | torch.where(payload == 0, 1, payload)
    h = torch.where(torch.isnan(b), nan, h)
    return torch.stack([h & 0xFF, (h >> 8) & 0xFF], dim=-1).to(torch.uint8).view(b.shape[0], 2)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    """gguf's (and ggml's) float32 -> bf16: NaN made quiet, then round to nearest even on the bits."""
    n = b.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | 0x00400000, n)
    n = (n + 0x7FFF + ((n >> 16) & 1)) >> 16
    return torch.stack([n & 0xFF, (n >> 8) & 0xFF], dim=-1).to(torch.uint8).view(b.shape[0], 2)


# --- 32-value blocks, bit-exact with gguf ------------------------------------------------------------------

def _trunc_codes(t: torch.Tensor, qmax: int) -> torch.Tensor:
    """gguf's ``trunc(t).astype(uint8).clip(0, qmax)`` for t >= 0, clamped in float first (NaN -> 0) so the
    integer conversion is defined on every device."""
    return torch.nan_to_num(torch.trunc(t), nan=0.0).clamp(0.0, float(qmax)).to(torch.int32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Low nibbles of 32 codes [n, 32] -> 16 bytes: qs[j] = q[j] & 15 | (q[j + 16] & 15) << 4."""
    return pack_bits(q & 0x0F, 1, 16, (0, 4))


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 codes [n, 32] -> 4 bytes, code i at bit i of a little-endian u32 (numpy's packbits)."""
    return pack_bits((q >> 4) & 1, 4, 1, tuple(range(8)))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = div(b.abs().amax(dim=-1, keepdim=True), 127.0)
    p = b * inverse(d)
    # gguf's np_roundf: round half away from zero via floor(a) + floor(2 * (a - floor(a))) (exact steps)
    a = p.abs()
    r = a.floor()
    r = r + torch.floor((a - r) * 2.0)
    r = torch.nan_to_num(r, nan=0.0).clamp(max=127.0)  # only blocks whose 1/d overflowed reach past 127
    q = torch.where(p < 0, -r, r).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=-1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = div(signed_max(b).unsqueeze(-1), -8.0)
    q = _trunc_codes(b * inverse(d) + 8.5, 15)  # two roundings, as gguf (product, then sum)
    return torch.cat([f16_bytes(d), _nibbles(q)], dim=-1)


def _min_max(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each block, a zero one always +0: which zero a reduction over -0 and +0 returns
    depends on the device and memory layout (numpy's too), so pin it."""
    return b.amin(dim=-1, keepdim=True) + 0.0, b.amax(dim=-1, keepdim=True) + 0.0


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max(b)
    d = div(hi - lo, 15.0)
    q = _trunc_codes((b - lo) * inverse(d) + 0.5, 15)
    return torch.cat([f16_bytes(d), f16_bytes(lo), _nibbles(q)], dim=-1)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = div(signed_max(b).unsqueeze(-1), -16.0)
    q = _trunc_codes(b * inverse(d) + 16.5, 31)
    return torch.cat([f16_bytes(d), _high_bits(q), _nibbles(q)], dim=-1)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max(b)
    d = div(hi - lo, 31.0)
    q = _trunc_codes((b - lo) * inverse(d) + 0.5, 31)
    return torch.cat([f16_bytes(d), f16_bytes(lo), _high_bits(q), _nibbles(q)], dim=-1)


# (blocks float32 [n, block_size]) -> uint8 [n, type_size]
_QUANTIZERS: dict[str, BlockQuantizer] = {
    "f32": _f32, "f16": _f16, "bf16": _bf16, "q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0,
    "q5_1": _q5_1, **K_QUANTIZERS,
}
# Formats quantize_blocks accepts, in gguf type id order. The grid IQ types (iq1_s, iq1_m, iq2_xxs, iq2_xs,
# iq2_s, iq3_xxs, iq3_s) are out of scope: their codes index lattice grids whose search is a quantizer of
# its own.
QUANTIZABLE: tuple[str, ...] = tuple(sorted(_QUANTIZERS, key=lambda name: REGISTRY[name].gguf_type))


def quantize_blocks(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGUF blocks of type ``fmt`` (a name of QUANTIZABLE) of ``values`` [..., K] (float32, bfloat16 or float16,
    any device), quantized along the last dimension: uint8 [..., row_bytes] on the same device, row_bytes =
    REGISTRY[fmt].blocks_bytes(K). ValueError naming ``fmt`` for a type it cannot quantize, or ``values`` if
    K is not a multiple of the type's block size."""
    if not isinstance(values, torch.Tensor) or values.dtype not in _INPUT_DTYPES:
        raise ValueError(f"values must be a float32, bfloat16 or float16 tensor, "
                         f"got {getattr(values, 'dtype', type(values))}")
    record = get(fmt, what="fmt", allowed=QUANTIZABLE)
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension (the row of values to quantize)")
    k = values.shape[-1]
    if k % record.block_size:
        raise ValueError(f"values' last dimension {k} must be a multiple of {record.block_size} for fmt {record.name}")
    row_bytes = record.blocks_bytes(k)
    rows = values.reshape(-1, k)
    out = torch.empty(rows.shape[0], row_bytes, dtype=torch.uint8, device=values.device)
    if out.numel() == 0:
        return out.reshape(*values.shape[:-1], row_bytes)
    quantize = _QUANTIZERS[record.name]
    step = max(1, CHUNK_VALUES // k)
    for r0 in range(0, rows.shape[0], step):
        blocks = rows[r0:r0 + step].float().reshape(-1, record.block_size)
        out[r0:r0 + step] = quantize(blocks).view(-1, row_bytes)
    return out.reshape(*values.shape[:-1], row_bytes)
