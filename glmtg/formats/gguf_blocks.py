"""Torch dequantization of llama.cpp's weight blocks, bit for bit as ``gguf.quants.dequantize`` computes it.

A GGUF tensor stores each row as whole blocks, each block its scales and codes interleaved in
``type_size`` bytes (the "blocks" layout; KV caches keep codes and scales in two tensors instead). Every
function here takes those raw bytes, uint8 [..., n_blocks * type_size] on any device, and returns float32
[..., n_blocks * block_size], vectorised over all blocks at once.

Bit-exactness rests on doing gguf's float32 arithmetic in gguf's order: fp16 fields are widened to
float32 exactly, integer codes become float32 exactly, and each product or sum gguf forms is formed here.
Every product of a finite fp16 scale (11 significant bits) and the integer scales and codes is exact in
float32 (at most 24 significant bits, and never near float32's range limits), except q6_k's last product
(25 bits), which rounds once. So each value is its exact expression rounded once to float32, whatever the
association of the products, and a fused multiply-add (``d * q + m``) rounds to the same value: kernels
may dequantize with FMA and stay bit-exact for finite scales. NaN or Inf scales give NaN or Inf where gguf
gives them. The fp16 widening keeps NaN payloads as they are (torch's own cast quiets signalling NaNs,
gguf does not).
"""

from __future__ import annotations

from typing import Callable

import torch

from glmtg.formats.ggml_types import GGML_TYPE_IDS, GGML_TYPES

QK_K = 256  # values per k-quant / iq super-block
# IQ4_NL's 16 non-linear levels (ggml's kvalues_iq4nl), shared by IQ4_XS.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

DequantizeBlocks = Callable[[torch.Tensor], torch.Tensor]
# (blocks uint8 [n, type_size]) -> float32 [n, block_size]
_PerBlock = Callable[[torch.Tensor], torch.Tensor]


def _as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes ``b`` [..., k * itemsize] reinterpreted as ``dtype`` [..., k] (little-endian, as GGUF)."""
    shape = b.shape
    # Flat first: a one-row slice of blocks keeps the block-wide row stride even when "contiguous", which
    # a dtype view refuses; a flat tensor needs only an aligned start (else copy once).
    flat = b.reshape(-1).contiguous()
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype).view(*shape[:-1], shape[-1] // dtype.itemsize)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 fields (bytes [..., 2k]) widened to float32 [..., k] exactly, NaN payloads kept (as numpy does)."""
    h = _as(b, torch.int16)
    wide = h.view(torch.float16).float()
    bits = h.to(torch.int32)
    # sign, all-ones exponent, the 10 mantissa bits moved to the top of float32's 23
    nan = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return torch.where(torch.isnan(wide), nan.view(torch.float32), wide)


def _unpack(b: torch.Tensor, groups: int, width: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """numpy's ``(b.reshape(n, groups, 1, width) >> shifts[:, None]) & mask``, flattened to [n, values].

    Value index g * len(shifts) * width + s * width + j comes from byte g * width + j, bits shifts[s]..."""
    sh = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    q = (b.reshape(b.shape[0], groups, 1, width) >> sh) & mask
    return q.reshape(b.shape[0], groups * len(shifts) * width)


def _split(b: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """The byte fields of each block: columns [0, sizes[0]), [sizes[0], sizes[0] + sizes[1]), ..."""
    return list(torch.split(b, list(sizes), dim=-1))


# --- float types: one value per "block" ---------------------------------------------------------------

def _f32(b: torch.Tensor) -> torch.Tensor:
    return _as(b, torch.float32)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # bfloat16 is the top half of a float32: a shift, exact for every bit pattern
    return (_as(b, torch.int16).to(torch.int32) << 16).view(torch.float32)


# --- 32-value blocks -----------------------------------------------------------------------------------

def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = _split(b, 2, 32)
    return qs.view(torch.int8).float() * _f16(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = _split(b, 2, 16)
    q = _unpack(qs, 1, 16, (0, 4), 0x0F).float() - 8.0  # small integers: exact
    return _f16(d) * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(b, 2, 2, 16)
    q = _unpack(qs, 1, 16, (0, 4), 0x0F).float()
    return _f16(d) * q + _f16(m)


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """The 32 five-bit codes of a q5 block: low nibbles from qs, bit 4 of value i from bit i of qh (LE u32)."""
    high = _unpack(qh, 4, 1, tuple(range(8)), 0x01)  # byte k bit s -> value 8k + s
    return _unpack(qs, 1, 16, (0, 4), 0x0F) | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(b, 2, 4, 16)
    return _f16(d) * (_q5_codes(qh, qs).float() - 16.0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(b, 2, 2, 4, 16)
    return _f16(d) * _q5_codes(qh, qs).float() + _f16(m)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d, qs = _split(b, 2, 16)
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=b.device)
    return _f16(d) * levels[_unpack(qs, 1, 16, (0, 4), 0x0F).long()]


# --- 256-value super-blocks ----------------------------------------------------------------------------

def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = _split(b, 16, 64, 2, 2)
    dl = (_f16(d) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).view(n, 16, 1)
    q = _unpack(qs, 2, 32, (0, 2, 4, 6), 0x03).float().view(n, 16, 16)
    return (dl * q - ml).view(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = _split(b, 32, 64, 12, 2)
    low = _unpack(scales[:, :8], 1, 8, (0, 4), 0x0F)  # 4 low bits of the 16 six-bit scales
    high = _unpack(scales[:, 8:], 1, 4, (0, 2, 4, 6), 0x03)  # their 2 high bits
    sc = (low | (high << 4)).float() - 32.0
    dl = (_f16(d) * sc).view(n, 16, 1)
    ql = _unpack(qs, 2, 32, (0, 2, 4, 6), 0x03)
    # a set hmask bit means no offset; a clear one subtracts 4
    qh = _unpack(hmask, 1, 32, tuple(range(8)), 0x01) ^ 1
    q = (ql.float() - (qh << 2).float()).view(n, 16, 16)
    return (dl * q).view(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins packed in the 12 scale bytes of q4_K / q5_K."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(d: torch.Tensor, dmin: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(d * sc) * q - (dmin * m) per 32-value sub-block, each product rounded as gguf rounds it."""
    n = q.shape[0]
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * sc.float()).view(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).view(n, 8, 1)
    return (dl * q.float().view(n, 8, 32) - ml).view(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qs = _split(b, 2, 2, 12, 128)
    return _k_affine(d, dmin, scales, _unpack(qs, 4, 32, (0, 4), 0x0F))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qh, qs = _split(b, 2, 2, 12, 32, 128)
    q = _unpack(qs, 4, 32, (0, 4), 0x0F) | (_unpack(qh, 1, 32, tuple(range(8)), 0x01) << 4)
    return _k_affine(d, dmin, scales, q)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = _split(b, 128, 64, 16, 2)
    q = _unpack(ql, 2, 64, (0, 4), 0x0F) | (_unpack(qh, 2, 32, (0, 2, 4, 6), 0x03) << 4)
    dl = (_f16(d) * scales.view(torch.int8).float()).view(n, 16, 1)
    return (dl * (q.float() - 32.0).view(n, 16, 16)).view(n, QK_K)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, scales_h, scales_l, qs = _split(b, 2, 2, 4, 128)
    low = _unpack(scales_l, 4, 1, (0, 4), 0x0F)
    high = _unpack(scales_h, 2, 1, (0, 2, 4, 6), 0x03)  # little-endian u16, two bits per sub-block
    dl = (_f16(d) * ((low | (high << 4)).float() - 32.0)).view(n, 8, 1)
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=b.device)
    q = levels[_unpack(qs, 8, 16, (0, 4), 0x0F).long()].view(n, 8, 32)
    return (dl * q).view(n, QK_K)


def blockwise(block_size: int, type_size: int, per_block: _PerBlock) -> DequantizeBlocks:
    """The public ``dequantize_blocks(raw)`` of a type: checks ``raw``, splits it into blocks, reshapes back."""

    def dequantize_blocks(raw: torch.Tensor) -> torch.Tensor:
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            raise ValueError(f"raw must be a torch.uint8 tensor of blocks, got {getattr(raw, 'dtype', type(raw))}")
        if raw.dim() == 0 or raw.shape[-1] % type_size:
            raise ValueError(f"raw's last dimension must be a multiple of the {type_size}-byte block, "
                             f"got shape {tuple(raw.shape)}")
        n_values = raw.shape[-1] // type_size * block_size
        if raw.numel() == 0:
            return torch.empty(*raw.shape[:-1], n_values, dtype=torch.float32, device=raw.device)
        out = per_block(raw.reshape(-1, type_size))
        return out.reshape(*raw.shape[:-1], n_values)

    dequantize_blocks.__doc__ = (f"raw uint8 [..., n * {type_size}] -> float32 [..., n * {block_size}], "
                                 "bit-exact with gguf.quants.dequantize")
    return dequantize_blocks


# name -> (gguf type id, block_size, type_size, per-block dequantization): the GGUF weight types decoded
# here; ids and sizes come from ggml's own table (ggml_types.GGML_TYPES).
_DECODERS: dict[str, _PerBlock] = {
    "f32": _f32, "f16": _f16, "bf16": _bf16, "q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0,
    "q5_1": _q5_1, "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k,
    "iq4_nl": _iq4_nl, "iq4_xs": _iq4_xs,
}
BLOCK_TYPES: dict[str, tuple[int, int, int, _PerBlock]] = {
    name: (GGML_TYPE_IDS[name.upper()], GGML_TYPES[GGML_TYPE_IDS[name.upper()]].block_size,
           GGML_TYPES[GGML_TYPE_IDS[name.upper()]].type_size, per_block)
    for name, per_block in _DECODERS.items()
}


def dequantizer(name: str) -> DequantizeBlocks:
    """The checked ``dequantize_blocks`` of GGUF type ``name`` (a key of BLOCK_TYPES)."""
    _, block_size, type_size, per_block = BLOCK_TYPES[name]
    return blockwise(block_size, type_size, per_block)
