"""Torch quantizers of the 256-value k-quant types (q2_k ... q6_k) and the 4-bit non-linear types
(iq4_nl, iq4_xs), plus the bit packing the 32-value quantizers of gguf_quantize.py share.

The ``gguf`` package cannot quantize these types, so there is no bit-exact reference. This is NOT
llama.cpp's quantizer: llama.cpp's quantize_row_*_ref search scales that minimise a weighted squared error
(make_qkx2_quants, make_qx_quants, best-scale searches for iq4). Here every scale comes from the min/max of
its sub-block, made just large enough to cover it, in one pass. That gives a hard error bound per value
and the same bytes on every device (only min, max, and single correctly rounded operations: no sums whose
order could differ), at the price of a larger mean error than llama.cpp's search: KL-divergences measured
on weights quantized here are those of this quantizer, somewhat worse than llama.cpp's files of the
same type.

The scheme, per super-block of 256 values in sub-blocks of 16 or 32:

- each sub-block j gets an ideal step s_j that covers its values (see below);
- the super-block scale is d = fp16 rounded *up* (magnitude) of max_j s_j / L, L the largest sub-scale
  code (q6_k 127, q2_k 15, the others 63 or 31), and the sub-scale code is sc_j = ceil(s_j / d) <= L, so
  the stored step d * sc_j (exactly what the decoder forms) is >= s_j, and exceeds it by at most d;
- codes are round-to-nearest of x / step, clamped to the code range.

Symmetric types (q6_k: codes -32..31, q3_k: -4..3): s_j = amax_j / (qmax + 1/2). The grid
{-(qmax+1) .. qmax} * step then covers [-amax, amax] to within half a step at each end, so
|x - x̂| <= step_j / 2.

Affine types (q2_k, q4_k, q5_k: x̂ = step * q - m, q in 0..qmax, m = dmin * mn >= 0): lo_j = min(min x, 0)
(the offset can only subtract, as in llama.cpp), s_j = (max x - lo_j) / (qmax + 1), the offset target
max(0, -lo_j - s_j / 2) rounded up to dmin's ladder like the steps, then s_j raised if needed so the top
of the grid plus half a step still covers max x. Again |x - x̂| <= step_j / 2.

Non-linear types (iq4_nl: one fp16 d per 32 values; iq4_xs: fp16 d and signed 6-bit sub-scales per 32):
the step is signed so that the value of largest magnitude maps towards the level -127, |step| >= amax / 127;
each value takes the nearest of the 16 levels. The levels' largest half gap is 12 and the top level is 113,
so |x - x̂| <= 14 * |step|.

All bounds hold up to float32 rounding (a few ulps of the block's largest value). Blocks whose scales
overflow fp16 (values beyond ~6.5e4 times the code range) get Inf/NaN scales, as llama.cpp's would; NaN or
Inf inputs give unspecified codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from glmtg.formats.gguf_blocks import IQ4_LEVELS, QK_K

# (blocks float32 [n, block_size]) -> uint8 [n, type_size]
BlockQuantizer = Callable[[torch.Tensor], torch.Tensor]


# --- shared helpers --------------------------------------------------------------------------------------

def div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c correctly rounded on every device: CUDA divides by a Python scalar as a multiplication by its
    rounded reciprocal (one bit off at times), so divide by a tensor instead."""
    return x / torch.tensor(c, dtype=x.dtype, device=x.device)


def inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (gguf's ``id``)."""
    one = torch.ones_like(d)
    return torch.where(d == 0, 0.0, one / torch.where(d == 0, one, d))


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float values [n, k] (float32 or float16) as little-endian fp16 bytes [n, 2k], rounded to nearest even."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def f16_up(x: torch.Tensor) -> torch.Tensor:
    """float16 of float32 ``x`` rounded away from zero: |result| >= |x| (one fp16 step above at most)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    # sign-magnitude: adding one to the bits moves one step away from zero (65504 -> Inf)
    bits = torch.where(h.float().abs() < x.abs(), bits + 1, bits)
    return bits.view(torch.float16)


def pack_bits(q: torch.Tensor, groups: int, width: int, shifts: tuple[int, ...]) -> torch.Tensor:
    """The inverse of gguf_blocks._unpack: small codes q [n, groups * len(shifts) * width] (already masked to
    their bits) -> uint8 [n, groups * width], value g * S * width + s * width + j in byte g * width + j at
    bit shifts[s]."""
    n = q.shape[0]
    sh = torch.tensor(shifts, dtype=torch.int32, device=q.device).view(1, 1, -1, 1)
    parts = q.to(torch.int32).view(n, groups, len(shifts), width) << sh
    return parts.sum(dim=2).to(torch.uint8).view(n, groups * width)  # disjoint bits: the sum is the OR


def _ladder(s: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps s [n, J] (>= 0) on a super-block scale: (fp16 d [n, 1], sub-scale codes [n, J] in 0..levels,
    stored steps d * code [n, J] >= s up to float32 rounding)."""
    d16 = f16_up(div(s.amax(dim=-1, keepdim=True), float(levels)))
    d = d16.float()
    sc = torch.where(d > 0, torch.ceil(s / torch.where(d > 0, d, 1.0)), 0.0).clamp(0.0, float(levels))
    return d16, sc, d * sc


def _codes(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / step) clamped to lo..hi (0 where step == 0), as int32."""
    v = torch.where(step != 0, x / torch.where(step != 0, step, 1.0), 0.0)
    return torch.round(v).clamp(float(lo), float(hi)).to(torch.int32)


def _nearest_level(v: torch.Tensor) -> torch.Tensor:
    """Index of the IQ4 level nearest to each v (int32)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=v.device)
    mids = (levels[1:] + levels[:-1]) * 0.5
    return torch.bucketize(v.contiguous(), mids).to(torch.int32)


# --- symmetric k-quants --------------------------------------------------------------------------------------

def _symmetric(x: torch.Tensor, qmax: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 d [n, 1], sub-scale codes [n, J], codes [n, J * m] in -(qmax+1)..qmax) of sub-blocks x [n, J, m]."""
    s = div(x.abs().amax(dim=-1), qmax + 0.5)
    d16, sc, step = _ladder(s, levels)
    q = _codes(x, step.unsqueeze(-1), -(qmax + 1), qmax)
    return d16, sc, q.flatten(1)


def quantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 210]: ql (low nibbles), qh (2 high bits), int8 scales, fp16 d."""
    n = b.shape[0]
    d16, sc, q = _symmetric(b.view(n, 16, 16), 31, 127)
    q = q + 32
    ql = pack_bits(q & 0x0F, 2, 64, (0, 4))
    qh = pack_bits(q >> 4, 2, 32, (0, 2, 4, 6))
    scales = sc.to(torch.int32).to(torch.uint8)  # 0..127: the int8 bytes of non-negative scales
    return torch.cat([ql, qh, scales, f16_bytes(d16)], dim=-1)


def quantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 110]: hmask (bit 2 of code + 4), qs (2 low bits), 6-bit scales + 32, fp16 d."""
    n = b.shape[0]
    d16, sc, q = _symmetric(b.view(n, 16, 16), 3, 31)
    q = q + 4  # 0..7; the decoder subtracts 4 where the hmask bit is clear
    hmask = pack_bits(q >> 2, 1, 32, tuple(range(8)))
    qs = pack_bits(q & 0x03, 2, 32, (0, 2, 4, 6))
    sc6 = sc.to(torch.int32) + 32
    scales = torch.cat([pack_bits(sc6 & 0x0F, 1, 8, (0, 4)), pack_bits(sc6 >> 4, 1, 4, (0, 2, 4, 6))], dim=-1)
    return torch.cat([hmask, qs, scales, f16_bytes(d16)], dim=-1)


# --- affine k-quants -----------------------------------------------------------------------------------------

def _affine(x: torch.Tensor, qmax: int, levels: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 d [n, 1], fp16 dmin [n, 1], scale codes [n, J], min codes [n, J], codes [n, J * m] in 0..qmax)
    of sub-blocks x [n, J, m], decoded as d * sc * q - dmin * mn."""
    # + 0.0: a zero min or max is +0 on every device (a reduction over -0 and +0 may return either)
    lo = x.amin(dim=-1).clamp(max=0.0) + 0.0
    hi = x.amax(dim=-1) + 0.0
    s = div(hi - lo, qmax + 1.0)
    # offset of the grid's first point: half a step below lo, but the decoder only subtracts (>= 0)
    target = (-lo - s * 0.5).clamp(min=0.0)
    dmin16, mn, offset = _ladder(target, levels)
    s = torch.maximum(s, div(hi + offset, qmax + 0.5))  # top of the grid + half a step covers hi
    d16, sc, step = _ladder(s, levels)
    q = _codes(x + offset.unsqueeze(-1), step.unsqueeze(-1), 0, qmax)
    return d16, dmin16, sc.to(torch.int32), mn.to(torch.int32), q.flatten(1)


def _k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins [n, 8] -> q4_k / q5_k's 12 packed bytes."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    parts = [lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6), (hi_sc & 0x0F) | ((hi_mn & 0x0F) << 4)]
    return torch.cat(parts, dim=-1).to(torch.uint8)


def quantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 144]: fp16 d, fp16 dmin, 12 scale bytes, 4-bit codes."""
    n = b.shape[0]
    d16, dmin16, sc, mn, q = _affine(b.view(n, 8, 32), 15, 63)
    return torch.cat([f16_bytes(d16), f16_bytes(dmin16), _k_scales(sc, mn), pack_bits(q, 4, 32, (0, 4))], dim=-1)


def quantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 176]: fp16 d, fp16 dmin, 12 scale bytes, bit 4 of the codes, their low nibbles."""
    n = b.shape[0]
    d16, dmin16, sc, mn, q = _affine(b.view(n, 8, 32), 31, 63)
    qh = pack_bits(q >> 4, 1, 32, tuple(range(8)))
    qs = pack_bits(q & 0x0F, 4, 32, (0, 4))
    return torch.cat([f16_bytes(d16), f16_bytes(dmin16), _k_scales(sc, mn), qh, qs], dim=-1)


def quantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 84]: 16 bytes of (4-bit scale | 4-bit min << 4), 2-bit codes, fp16 d, fp16 dmin."""
    n = b.shape[0]
    d16, dmin16, sc, mn, q = _affine(b.view(n, 16, 16), 3, 15)
    scales = (sc | (mn << 4)).to(torch.uint8)
    return torch.cat([scales, pack_bits(q, 2, 32, (0, 2, 4, 6)), f16_bytes(d16), f16_bytes(dmin16)], dim=-1)


# --- non-linear 4-bit ---------------------------------------------------------------------------------------

def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The first value of largest magnitude along the last dimension, sign and all (gguf's
    ``take_along_axis(x, abs(x).argmax())``; torch's argmax also returns the first maximal index)."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def quantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    """[n, 32] -> [n, 18]: fp16 d, 4-bit level indices."""
    d16 = f16_up(div(signed_max(b), -127.0)).unsqueeze(-1)  # the largest |x| maps near level -127
    d = d16.float()
    v = torch.where(d != 0, b / torch.where(d != 0, d, 1.0), 0.0)
    return torch.cat([f16_bytes(d16), pack_bits(_nearest_level(v), 1, 16, (0, 4))], dim=-1)


def quantize_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 136]: fp16 d, high 2 bits of the 6-bit scales, their low nibbles, 4-bit level indices."""
    n = b.shape[0]
    x = b.view(n, 8, 32)
    s = div(signed_max(x), -127.0)  # signed sub-block steps [n, 8]
    d16, mag, _ = _ladder(s.abs(), 31)  # sub-scales -31..31 (stored + 32), sign taken from s
    sc = torch.where(s < 0, -mag, mag)
    step = (d16.float() * sc).unsqueeze(-1)
    v = torch.where(step != 0, x / torch.where(step != 0, step, 1.0), 0.0)
    ls = sc.to(torch.int32) + 32
    scales_h = pack_bits(ls >> 4, 2, 1, (0, 2, 4, 6))
    scales_l = pack_bits(ls & 0x0F, 4, 1, (0, 4))
    qs = pack_bits(_nearest_level(v).view(n, QK_K), 8, 16, (0, 4))
    return torch.cat([f16_bytes(d16), scales_h, scales_l, qs], dim=-1)


K_QUANTIZERS: dict[str, BlockQuantizer] = {
    "q2_k": quantize_q2_k, "q3_k": quantize_q3_k, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k,
    "q6_k": quantize_q6_k, "iq4_nl": quantize_iq4_nl, "iq4_xs": quantize_iq4_xs,
}
