"""Torch quantizers of the 256-value k-quant types (q2_k ... q6_k) and the 4-bit non-linear types
(iq4_nl, iq4_xs), plus the bit packing the 32-value quantizers of gguf_quantize.py share.

The ``gguf`` package cannot quantize these types, so there is no bit-exact reference, and this is NOT
llama.cpp's quantizer (quantize_row_*_ref: make_qkx2_quants / make_qx_quants, a fine search of scales
with a weighted least-squares refit). It is a min/max quantizer with a small search of its own: each
sub-block's step starts as the step whose grid just covers the sub-block, and is then scaled by the best
of a few factors (least squared error; see WIDEN). Measured on N(0, 1) and Student-t rows its relative RMSE
is 0.94-1.07x that of llama.cpp's quantize_row_*_ref without an importance matrix (q4_k 1.07x, q5_k 1.06x,
q6_k 1.01x, the others <= 1.01x; tests/formats/test_gguf_quantize.py keeps it within 1.10x): KL-divergences
measured on weights quantized here stand for this quantizer, close to but not equal to llama.cpp's files.
Every operation is a min, a max, integer work or a single correctly rounded float operation, and squared
errors are summed as integers, so CPU and CUDA write the same bytes; every value has a hard error bound.

The scheme, per super-block of 256 values in sub-blocks of 16 or 32:

- each sub-block j gets a covering step s_j (below) times its chosen factor f_j;
- the super-block scale is d = fp16 rounded *up* (magnitude) of max_j s_j / L, L the largest sub-scale
  code (q6_k 127, q2_k 15, the others 63 or 31), and the sub-scale code is sc_j = ceil(s_j / d) <= L, so
  the stored step d * sc_j (exactly what the decoder forms) is >= s_j, and exceeds it by at most d;
- codes are round-to-nearest of x / step, clamped to the code range.

Symmetric types (q6_k: codes -32..31, q3_k: -4..3, signed sub-scales): the step is signed so that the
first value of largest magnitude goes to the negative end, which has one code more: |s_j| = max(amax_j /
(qmax + 3/2), near_j / (qmax + 1/2)), near_j the largest magnitude of the opposite sign. The grid
{-(qmax+1) .. qmax} * step then covers the sub-block to within half a step at each end, so
|x - x̂| <= |step_j| / 2 for f_j >= 1.

Affine types (q2_k, q4_k, q5_k: x̂ = step * q - m, q in 0..qmax, m = dmin * mn >= 0): lo_j = min(min x, 0)
(the offset can only subtract, as in llama.cpp), the range [lo_j, max x] scaled by f_j about its centre,
s_j = its span / (qmax + 1), the offset target max(0, -(bottom + s_j / 2)) rounded up to dmin's ladder
like the steps, then s_j raised if needed so the top of the grid plus half a step still covers the top.
Again |x - x̂| <= step_j / 2 for f_j >= 1.

Non-linear types (iq4_nl: one fp16 d per 32 values; iq4_xs: fp16 d and signed 6-bit sub-scales per 32):
the step is signed so that the value of largest magnitude maps towards the level -127, |step| >= f_j *
amax / 127; each value takes the nearest of the 16 levels. The levels' largest half gap is 12 and the top
level is 113, so |x - x̂| <= 14 * |step| for f_j = 1.

A factor f_j < 1 clips the sub-block's extremes by at most (1 - f_j) times its reach (amax, or half the
span for the affine grid's two ends), added to the bounds above. All bounds hold up to float32 rounding
(a few ulps of the block's largest value). Blocks whose scales overflow fp16 (values beyond ~6.5e4 times
the code range) get Inf/NaN scales, as llama.cpp's would; NaN or Inf inputs give unspecified codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from glmtg.formats.gguf_blocks import IQ4_LEVELS

# (blocks float32 [n, block_size]) -> uint8 [n, type_size]
BlockQuantizer = Callable[[torch.Tensor], torch.Tensor]
# Factors tried on each sub-block's covering step (1: the grid's end points half a step inside the
# sub-block's extremes), the one with the least squared error kept. Widening (> 1) puts the end points on
# the few extreme values (4-6 bit types); narrowing (< 1) clips them for a finer step (2-3 bit, iq4).
# llama.cpp searches the same trade-off, with a least-squares refit on top.
WIDEN = (1.0, 1.025, 1.05, 1.075, 1.1, 1.125, 1.15)
WIDEN_NARROW = (1.0, 0.95, 0.9, 0.85, 0.8, 1.05, 1.1, 1.15, 1.2)
NARROW = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


# --- shared helpers --------------------------------------------------------------------------------------

def div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c correctly rounded on every device: CUDA divides by a Python scalar as a multiplication by its
    rounded reciprocal (one bit off at times), so divide by a tensor (filled on the device: no host copy)."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


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


def pack_bits(q: torch.Tensor, groups: int, width: int, bits: int) -> torch.Tensor:
    """The inverse of gguf_blocks._unpack with shifts (0, bits, 2 * bits, ...) filling each byte: codes
    q [n, groups * (8 // bits) * width] (already masked to ``bits`` bits) -> uint8 [n, groups * width], value
    g * S * width + s * width + j in byte g * width + j at bit s * bits (S = 8 // bits)."""
    n, per = q.shape[0], 8 // bits
    sh = torch.arange(0, 8, bits, dtype=torch.int32, device=q.device).view(1, 1, per, 1)
    parts = q.to(torch.int32).view(n, groups, per, width) << sh
    return parts.sum(dim=2).to(torch.uint8).view(n, groups * width)  # disjoint bits: the sum is the OR


def _ladder(s: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps s [n, J] (>= 0) on a super-block scale: (fp16 d [n, 1], sub-scale codes [n, J] in 0..levels,
    stored steps d * code [n, J] >= s up to float32 rounding)."""
    d16 = f16_up(div(s.amax(dim=-1, keepdim=True), float(levels)))
    d = d16.float()
    sc = torch.where(d > 0, torch.ceil(s / torch.where(d > 0, d, 1.0)), 0.0).clamp(0.0, float(levels))
    return d16, sc, d * sc


def _nonzero(step: torch.Tensor) -> torch.Tensor:
    """step with zeros replaced by 1 (on the small tensor of steps, not per value): a step is zero only where
    every value sits on the grid's first point (x - first = 0: an all-zero or constant sub-block), which
    x / 1 = 0 then codes to 0."""
    return torch.where(step != 0, step, 1.0)


def _grid(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / step) clamped to lo..hi, as float32 (the grid index of each value)."""
    return torch.round(x / _nonzero(step)).clamp_(float(lo), float(hi))


def _codes(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / step) clamped to lo..hi, as int32."""
    return _grid(x, step, lo, hi).to(torch.int32)


@functools.cache
def _iq4_levels(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 IQ4 levels and the 15 midpoints between them, on ``device`` (made once: no host copy per chunk)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
    return levels.to(device), ((levels[1:] + levels[:-1]) * 0.5).to(device)


def _nearest_level(v: torch.Tensor) -> torch.Tensor:
    """Index of the IQ4 level nearest to each v (int32; a tie between two levels takes the lower)."""
    return torch.bucketize(v.contiguous(), _iq4_levels(v.device)[1]).to(torch.int32)


def _best_factor(x: torch.Tensor, norm: torch.Tensor, factors: tuple[float, ...],
                 reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per sub-block of x [n, J, m], the one of ``factors`` (as float32 [n, J]) whose ``reconstruct(f)``
    [n, J, m] has the least squared error. The squares of error / norm are rounded to integers (units of
    2^-40) before summing, so the sums, and the choice, are the same in any order on every device; a tie
    keeps the earlier factor."""
    scale = torch.where(norm > 0, 2.0 ** 20 / _nonzero(norm), 1.0).unsqueeze(-1)  # errors * 2^20 / norm
    best_err = best_f = None
    for factor in factors:
        f = torch.full_like(norm, factor)
        e = (x - reconstruct(f)).mul_(scale)
        err = e.mul_(e).clamp_(max=2.0 ** 56).round_().to(torch.int64).sum(dim=-1)
        if best_err is None:
            best_err, best_f = err, f
        else:
            better = err < best_err
            best_err, best_f = torch.where(better, err, best_err), torch.where(better, f, best_f)
    return best_f


# --- symmetric k-quants --------------------------------------------------------------------------------------

def _signed_ladder(s: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_ladder`` for signed steps s [n, J]: codes -levels..levels [n, J] carry the sign of s, and so do
    the stored steps, |step| >= |s|."""
    d16, mag, _ = _ladder(s.abs(), levels)
    sc = torch.where(s < 0, -mag, mag)
    return d16, sc, d16.float() * sc


def _symmetric(x: torch.Tensor, qmax: int, levels: int, factors: tuple[float, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 d [n, 1], signed sub-scale codes [n, J], codes [n, J * m] in -(qmax+1)..qmax) of sub-blocks
    x [n, J, m]. The step's sign sends the value of largest magnitude to the negative end, which has one code
    more: it needs |step| >= far / (qmax + 3/2), the other side |step| >= near / (qmax + 1/2)."""
    m = signed_max(x)
    near = torch.where(m < 0, x.amax(dim=-1), (-x).amax(dim=-1)).clamp(min=0.0)  # opposite sign to m
    mag = torch.maximum(div(m.abs(), qmax + 1.5), div(near, qmax + 0.5))
    s = torch.where(m < 0, mag, -mag)

    def reconstruct(f: torch.Tensor) -> torch.Tensor:
        step = (s * f).unsqueeze(-1)
        return _grid(x, step, -(qmax + 1), qmax).mul_(step)

    f = _best_factor(x, x.abs().amax(dim=-1), factors, reconstruct)
    d16, sc, step = _signed_ladder(s * f, levels)
    q = _codes(x, step.unsqueeze(-1), -(qmax + 1), qmax)
    return d16, sc.to(torch.int32), q.flatten(1)


def quantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 210]: ql (low nibbles), qh (2 high bits), int8 scales, fp16 d."""
    n = b.shape[0]
    d16, sc, q = _symmetric(b.view(n, 16, 16), 31, 127, WIDEN)
    q = q + 32
    ql = pack_bits(q & 0x0F, 2, 64, 4)
    qh = pack_bits(q >> 4, 2, 32, 2)
    scales = (sc & 0xFF).to(torch.uint8)  # -127..127 as int8 bytes
    return torch.cat([ql, qh, scales, f16_bytes(d16)], dim=-1)


def quantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 110]: hmask (bit 2 of code + 4), qs (2 low bits), 6-bit scales + 32, fp16 d."""
    n = b.shape[0]
    d16, sc, q = _symmetric(b.view(n, 16, 16), 3, 31, WIDEN_NARROW)
    q = q + 4  # 0..7; the decoder subtracts 4 where the hmask bit is clear
    hmask = pack_bits(q >> 2, 1, 32, 1)
    qs = pack_bits(q & 0x03, 2, 32, 2)
    sc6 = sc + 32  # -31..31 stored as 1..63
    scales = torch.cat([pack_bits(sc6 & 0x0F, 1, 8, 4), pack_bits(sc6 >> 4, 1, 4, 2)], dim=-1)
    return torch.cat([hmask, qs, scales, f16_bytes(d16)], dim=-1)


# --- affine k-quants -----------------------------------------------------------------------------------------

def _affine(x: torch.Tensor, qmax: int, levels: int, factors: tuple[float, ...]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 d [n, 1], fp16 dmin [n, 1], scale codes [n, J], min codes [n, J], codes [n, J * m] in 0..qmax)
    of sub-blocks x [n, J, m], decoded as d * sc * q - dmin * mn."""
    # + 0.0: a zero min or max is +0 on every device (a reduction over -0 and +0 may return either)
    lo = x.amin(dim=-1).clamp(max=0.0) + 0.0
    hi = x.amax(dim=-1) + 0.0
    span = hi - lo
    s = div(span, qmax + 1.0)

    def grid(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first grid point <= 0, step, top) of the grid over [lo, hi] scaled by f about its centre: the first
        point half a step above the scaled bottom (at most 0: the decoder only subtracts), the last point
        half a step below the scaled top (or the step raised until it is)."""
        cut = span * ((1.0 - f) * 0.5)
        top = hi - cut
        first = (lo + cut + s * f * 0.5).clamp(max=0.0)
        return first, torch.maximum(s * f, div(top - first, qmax + 0.5)), top

    def reconstruct(f: torch.Tensor) -> torch.Tensor:
        first, step, _ = (t.unsqueeze(-1) for t in grid(f))
        return _grid(x - first, step, 0, qmax).mul_(step).add_(first)

    f = _best_factor(x, span, factors, reconstruct)
    first, _, top = grid(f)
    dmin16, mn, offset = _ladder((-first).clamp(min=0.0) + 0.0, levels)
    s = torch.maximum(s * f, div(top + offset, qmax + 0.5))  # top of the grid + half a step covers top
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
    d16, dmin16, sc, mn, q = _affine(b.view(n, 8, 32), 15, 63, WIDEN)
    return torch.cat([f16_bytes(d16), f16_bytes(dmin16), _k_scales(sc, mn), pack_bits(q, 4, 32, 4)], dim=-1)


def quantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 176]: fp16 d, fp16 dmin, 12 scale bytes, bit 4 of the codes, their low nibbles."""
    n = b.shape[0]
    d16, dmin16, sc, mn, q = _affine(b.view(n, 8, 32), 31, 63, WIDEN)
    qh = pack_bits(q >> 4, 1, 32, 1)
    qs = pack_bits(q & 0x0F, 4, 32, 4)
    return torch.cat([f16_bytes(d16), f16_bytes(dmin16), _k_scales(sc, mn), qh, qs], dim=-1)


def quantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 84]: 16 bytes of (4-bit scale | 4-bit min << 4), 2-bit codes, fp16 d, fp16 dmin."""
    n = b.shape[0]
    d16, dmin16, sc, mn, q = _affine(b.view(n, 16, 16), 3, 15, WIDEN_NARROW)
    scales = (sc | (mn << 4)).to(torch.uint8)
    return torch.cat([scales, pack_bits(q, 2, 32, 2), f16_bytes(d16), f16_bytes(dmin16)], dim=-1)


# --- non-linear 4-bit ---------------------------------------------------------------------------------------

def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The first value of largest magnitude along the last dimension, sign and all (gguf's
    ``take_along_axis(x, abs(x).argmax())``; torch's argmax also returns the first maximal index)."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _iq4_steps(x: torch.Tensor) -> torch.Tensor:
    """Signed steps [n, J] of sub-blocks x [n, J, 32]: the largest |x| maps to level -127 (times a factor
    of NARROW chosen for the least squared error)."""
    s = div(signed_max(x), -127.0)
    levels = _iq4_levels(x.device)[0]

    def reconstruct(f: torch.Tensor) -> torch.Tensor:
        step = (s * f).unsqueeze(-1)
        return levels[_nearest_level(x / _nonzero(step)).long()].mul_(step)

    return s * _best_factor(x, x.abs().amax(dim=-1), NARROW, reconstruct)


def _level_codes(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Nearest level indices [n, J * 32] of x [n, J, 32] on signed steps [n, J]."""
    return _nearest_level(x / _nonzero(step.unsqueeze(-1))).flatten(1)


def quantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    """[n, 32] -> [n, 18]: fp16 d, 4-bit level indices."""
    x = b.view(b.shape[0], 1, 32)
    d16 = f16_up(_iq4_steps(x))  # [n, 1], |d| >= the chosen step
    return torch.cat([f16_bytes(d16), pack_bits(_level_codes(x, d16.float()), 1, 16, 4)], dim=-1)


def quantize_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 136]: fp16 d, high 2 bits of the 6-bit scales, their low nibbles, 4-bit level indices."""
    n = b.shape[0]
    x = b.view(n, 8, 32)
    d16, sc, step = _signed_ladder(_iq4_steps(x), 31)  # sub-scales -31..31, stored + 32
    ls = sc.to(torch.int32) + 32
    scales_h = pack_bits(ls >> 4, 2, 1, 2)
    scales_l = pack_bits(ls & 0x0F, 4, 1, 4)
    qs = pack_bits(_level_codes(x, step), 8, 16, 4)
    return torch.cat([f16_bytes(d16), scales_h, scales_l, qs], dim=-1)


K_QUANTIZERS: dict[str, BlockQuantizer] = {
    "q2_k": quantize_q2_k, "q3_k": quantize_q3_k, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k,
    "q6_k": quantize_q6_k, "iq4_nl": quantize_iq4_nl, "iq4_xs": quantize_iq4_xs,
}
