"""The "lanes" variant of the int8-dot GEMV (mmvq.py) for Q6_K and Q4_K at one token: several lanes share a
weight block, so the lanes of a warp read adjacent bytes.

Why: the base kernel (mmvq._mmvq_kernel with words_k's decoders) lays a step's blocks out on one flat axis
and leaves the lane layout to Triton, which for Q6_K's 2-byte-aligned 210-byte blocks puts neighbouring lanes
on different blocks: a warp's 16-bit load then touches a cache line per lane, and the kernel is bound by
load instructions, not by DRAM. Here a block is read by LANES lanes (Q6_K 8, Q4_K 4) that sit next to each
other in the warp, each lane owning one fixed slice of the block:

- Q6_K, lane (a, t0, h) for a, t0, h in {0, 1}: the 16 ql bytes 64a + 32t0 + 16h + 0..15 and the 16 qh
  bytes 128 + 32a + 16h + 0..15, i.e. the 32 values of sub-blocks (a, t = t0, h) and (a, t = t0 + 2, h)
  (value 128a + 32t + 16h + j, sub-block 8a + 2t + h, activation group 4a + t). A block is only 2-byte
  aligned, so each run of 4 words is read as 5 aligned 32-bit words (the block's byte offset rounded down
  to 4) and funnel-shifted by 0 or 16 bits (one ``shf.r.clamp`` a word): every load is a full, aligned
  word, and the 8 lanes of a block read 2 x 128 contiguous bytes.
- Q4_K (4-byte aligned 144-byte blocks), lane c in 0..3: the 32 qs bytes of chunk c (values 64c + j and
  64c + 32 + j, sub-blocks 2c and 2c + 1) as two 16-byte vector loads.

The tile of a step is [LANES, B] (B = block_n x G blocks: LANES lanes of a block first, then the blocks),
so lanes run over a block's slices and then over blocks; a lane's 4 (8) words are joined into a register
axis for the dp4a with its activation words (one vector load). Only the lane axis is ever reduced, once a
block: Triton reduces it with warp shuffles.

Numerics: the same integer dot products as the base path (Q6_K: Σ over one sub-block's 16 values; Q4_K:
over one 32-value sub-block), the same products in the same order ((scale · dx) · dot; Q4_K's mins
(mn · dx) · Σxq; the fp16 d (and dmin) applied once to a block's sum), summed in another fp32 order
(lanes, then blocks). Results equal the base variant's up to fp32 summation order.

Scope: one token (T = 1: decode at batch 1, the output head and the projections); ``mmvq`` sends T > 1 and
the other formats to the base kernel. Selected by ``variant`` (mmvq's argument) or GLMTG_MMVQ_VARIANT
("base", the default, or "lanes"; ``variant_mode`` switches it for a block).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from glmtg.kernels.gguf.decode import _PTX, _f16_at
from glmtg.kernels.gguf.decode_kquants import _half_hi, _half_lo
from glmtg.kernels.gguf.words_common import _dp4a
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release
from glmtg.switch import ModeSwitch

VARIANTS: tuple[str, ...] = ("base", "lanes")
LANES_FORMATS: tuple[str, ...] = ("q6_k", "q4_k")  # the formats the lanes variant reads
_switch = ModeSwitch("GLMTG_MMVQ_VARIANT (the mmvq kernel variant)", VARIANTS,
                     os.environ.get("GLMTG_MMVQ_VARIANT", "base"))
set_variant = _switch.set
variant_mode = _switch.scoped  # ``with mmvq_lanes.variant_mode("lanes"): ...``


def current_variant() -> str:
    """The process-wide variant (GLMTG_MMVQ_VARIANT, or as set since)."""
    return _switch.value


def uses_lanes(variant: str | None, fmt_name: str, tokens: int) -> bool:
    """Whether mmvq runs the lanes kernel for ``fmt_name`` at ``tokens`` under ``variant`` (None: the
    process-wide one); ValueError naming ``variant`` if it is not one of VARIANTS."""
    v = _switch.value if variant is None else variant
    if v not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return v == "lanes" and fmt_name in LANES_FORMATS and tokens == 1


def default_config(n: int, nb: int) -> tuple[int, int, int]:
    """(block_n, values per step, num_warps): one row and four 256-value blocks a step on one warp (a Q6_K
    step's tile is then 8 x 4 = one warp; Q4_K's 4 x 4 = half of one), the base kernel's measured launch
    for these formats (bench/DECISIONS.md H2). Not measured for this kernel yet."""
    return 1, 1024, 1


@triton.jit
def _funnel(lo, hi, sh):
    """The 32 bits at bit ``sh`` (0 or 16) of the 64-bit hi:lo (int32 words, ``sh`` broadcast): a word at a
    2-byte-aligned address from the two aligned words around it. Compiled: one shf.r.clamp."""
    if _PTX:
        r = tl.inline_asm_elementwise("shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        v = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
        r = (v >> sh.to(tl.int64)).to(tl.int32)
    return r


@triton.jit
def _run4(W32, idx, m, sh):
    """Four consecutive int32 words starting at a 2-byte-aligned byte address, each [L, B]: ``idx`` [L, B]
    the aligned word at or below it, ``sh`` [L, B] 0 or 16 (the address's low bits times 8). Five aligned
    32-bit loads, four funnel shifts."""
    a0 = tl.load(W32 + idx, mask=m, other=0)
    a1 = tl.load(W32 + idx + 1, mask=m, other=0)
    a2 = tl.load(W32 + idx + 2, mask=m, other=0)
    a3 = tl.load(W32 + idx + 3, mask=m, other=0)
    a4 = tl.load(W32 + idx + 4, mask=m, other=0)
    return _funnel(a0, a1, sh), _funnel(a1, a2, sh), _funnel(a2, a3, sh), _funnel(a3, a4, sh)


@triton.jit
def _x4(XW, xw, m):
    """Activation words xw + 0..3 ([L, B] word indices, 16-byte aligned: one vector load) as four [L, B]."""
    x = tl.load(XW + xw[:, :, None] + tl.arange(0, 4)[None, None, :], mask=m[:, :, None], other=0)
    even, odd = tl.split(tl.reshape(x, [xw.shape[0], xw.shape[1], 2, 2]))  # words 0, 2 and 1, 3
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _q6_signed(code):
    """Six-bit codes q (one per byte) -> int8 q - 32 per byte (as words_k._q6_signed)."""
    return (code + 0x60606060) ^ -0x7F7F7F80


@triton.jit
def _q6_k_lanes(W, off, bm, XW, DX, grp):
    """Σ w·dx·xq of each block [B] (byte offsets ``off`` int64 [B] into W, mask ``bm``, first activation
    group ``grp`` [B]); 8 lanes a block (module docstring)."""
    q = tl.arange(0, 8)
    a = q // 4
    t0 = (q // 2) % 2
    h = q % 2
    m2 = bm[None, :]
    W32 = W.to(tl.pointer_type(tl.int32))
    word0 = (off >> 2)[None, :]
    sh = tl.broadcast_to(((off & 3) * 8).to(tl.int32)[None, :], [8, off.shape[0]])
    ql0, ql1, ql2, ql3 = _run4(W32, word0 + (16 * a + 8 * t0 + 4 * h)[:, None], m2, sh)  # bytes 64a + 32t0 + 16h + ..
    qh0, qh1, qh2, qh3 = _run4(W32, word0 + (32 + 8 * a + 4 * h)[:, None], m2, sh)  # bytes 128 + 32a + 16h + ..
    part = tl.zeros(sh.shape, tl.float32)
    for tt in tl.static_range(2):
        t = t0 + 2 * tt  # [8]
        ts = (2 * t)[:, None]
        x0, x1, x2, x3 = _x4(XW, 8 * grp[None, :] + (32 * a + 8 * t + 4 * h)[:, None], m2)  # value word 32a + 8t + 4h
        # one sub-block's 16 values: low (tt = 0) or high nibbles of ql, bits 2t of qh
        dot = _dp4a(_q6_signed(((ql0 >> (4 * tt)) & 0x0F0F0F0F) | (((qh0 >> ts) << 4) & 0x30303030)), x0, 0)
        dot = _dp4a(_q6_signed(((ql1 >> (4 * tt)) & 0x0F0F0F0F) | (((qh1 >> ts) << 4) & 0x30303030)), x1, dot)
        dot = _dp4a(_q6_signed(((ql2 >> (4 * tt)) & 0x0F0F0F0F) | (((qh2 >> ts) << 4) & 0x30303030)), x2, dot)
        dot = _dp4a(_q6_signed(((ql3 >> (4 * tt)) & 0x0F0F0F0F) | (((qh3 >> ts) << 4) & 0x30303030)), x3, dot)
        s = tl.load(W + off[None, :] + (192 + 8 * a + 2 * t + h)[:, None], mask=m2, other=0)
        s = s.to(tl.int8, bitcast=True).to(tl.float32)
        dx = tl.load(DX + grp[None, :] + (4 * a + t)[:, None], mask=m2, other=0.0)
        part += s * dx * dot.to(tl.float32)
    return _f16_at(W + off + 208, bm) * tl.sum(part, axis=0)


@triton.jit
def _q4_k_lanes(W, off, bm, XW, DX, XS, grp):
    """As _q6_k_lanes for Q4_K: 4 lanes a block, lane c reads qs chunk c (module docstring)."""
    c = tl.arange(0, 4)
    m2 = bm[None, :]
    m3 = m2[:, :, None]
    i = tl.arange(0, 8)[None, None, :]
    W32 = W.to(tl.pointer_type(tl.int32))
    word0 = (off >> 2)[None, :]
    w = tl.load(W32 + (word0 + (4 + 8 * c)[:, None])[:, :, None] + i, mask=m3, other=0)  # bytes 16 + 32c + 4i
    xl = (8 * grp[None, :] + (16 * c)[:, None])[:, :, None] + i  # activation words of the low nibbles
    dl = tl.sum(_dp4a(w & 0x0F0F0F0F, tl.load(XW + xl, mask=m3, other=0), 0), axis=2)  # [4, B]
    dh = tl.sum(_dp4a((w >> 4) & 0x0F0F0F0F, tl.load(XW + xl + 8, mask=m3, other=0), 0), axis=2)
    # six-bit scales and mins of sub-blocks 2c and 2c + 1 (layout: words_k._k_scale_min)
    w_sc = tl.load(W32 + (off >> 2) + 1, mask=bm, other=0)[None, :]
    w_mn = tl.load(W32 + (off >> 2) + 2, mask=bm, other=0)[None, :]
    w_lo = tl.load(W32 + (off >> 2) + 3, mask=bm, other=0)[None, :]
    gl = grp[None, :] + (2 * c)[:, None]
    dxl = tl.load(DX + gl, mask=m2, other=0.0)
    dxh = tl.load(DX + gl + 1, mask=m2, other=0.0)
    sxl = tl.load(XS + gl, mask=m2, other=0).to(tl.float32)
    sxh = tl.load(XS + gl + 1, mask=m2, other=0).to(tl.float32)
    a = tl.zeros(dxl.shape, tl.float32)
    b = tl.zeros(dxl.shape, tl.float32)
    for hh in tl.static_range(2):
        s = (2 * c + hh)[:, None]
        shf = (s % 4) * 8
        first = s < 4
        sc = tl.where(first, (w_sc >> shf) & 0x3F, ((w_lo >> shf) & 0x0F) | ((w_sc >> (shf + 2)) & 0x30))
        mn = tl.where(first, (w_mn >> shf) & 0x3F, ((w_lo >> (shf + 4)) & 0x0F) | ((w_mn >> (shf + 2)) & 0x30))
        if hh == 0:
            a += sc.to(tl.float32) * dxl * dl.to(tl.float32)
            b += mn.to(tl.float32) * dxl * sxl
        else:
            a += sc.to(tl.float32) * dxh * dh.to(tl.float32)
            b += mn.to(tl.float32) * dxh * sxh
    w0 = tl.load(W32 + (off >> 2), mask=bm, other=0)  # fp16 d, fp16 dmin
    return _half_lo(w0) * tl.sum(a, axis=0) - _half_hi(w0) * tl.sum(b, axis=0)


@triton.jit
def _lanes_kernel(XW, DX, XS, W, Y, Bias, Res, N, NB, ROW_BYTES,
                  FMT: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    wait_and_release(PDL)  # x (and the residual) come from the kernels before (glmtg/kernels/pdl.py)
    B: tl.constexpr = BLOCK_N * G
    idx = tl.arange(0, B)
    r = idx // G
    g = idx % G
    rows_in = tl.minimum(tl.program_id(0) * BLOCK_N + r, N - 1)  # rows past N read row N - 1, not stored
    off = rows_in.to(tl.int64) * ROW_BYTES + g * TS  # byte offset of each block of the step
    grp = g * 8  # its first activation group (8 groups of 32 values a 256-value block)
    all_blocks = idx >= 0
    acc = tl.zeros((B,), dtype=tl.float32)
    full = NB // G
    for _ in range(full):
        if FMT == 14:
            acc += _q6_k_lanes(W, off, all_blocks, XW, DX, grp)
        else:
            acc += _q4_k_lanes(W, off, all_blocks, XW, DX, XS, grp)
        off += G * TS
        grp += G * 8
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + g) < NB
        if FMT == 14:
            acc += _q6_k_lanes(W, off, g_ok, XW, DX, grp)
        else:
            acc += _q4_k_lanes(W, off, g_ok, XW, DX, XS, grp)
    y = tl.sum(tl.reshape(acc, [BLOCK_N, G]), axis=1)  # [BLOCK_N]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    # The epilogue rounds as mmvq's (torch's unfused y + bias, then + residual).
    y = y.to(Y.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(Bias + rows, mask=ok, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)).to(Y.dtype.element_ty)
    if HAS_RES:
        res = tl.load(Res + rows, mask=ok, other=0.0)  # may be Y itself: read first, by this program alone
        y = (y.to(tl.float32) + res.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + rows, y, mask=ok)


def launch(codes: torch.Tensor, dx: torch.Tensor, sums: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
           bias: torch.Tensor | None, residual: torch.Tensor | None, fmt_type: int, type_size: int, nb: int,
           block_n: int, blocks_per_step: int, num_warps: int) -> None:
    """Run the lanes kernel for one token: ``out`` [1, N] (checked by mmvq, as every operand)."""
    n = weight.shape[0]
    _lanes_kernel[(triton.cdiv(n, block_n),)](
        codes.view(torch.int32), dx, sums, weight, out, out if bias is None else bias,
        out if residual is None else residual, n, nb, weight.shape[1],
        FMT=fmt_type, TS=type_size, BLOCK_N=block_n, G=blocks_per_step, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, PDL=enabled(out.device), num_warps=num_warps, **launch_kwargs(out.device),
    )
