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
    step's tile is then 8 lanes x 4 blocks = one warp), the base kernel's measured launch for these formats
    (bench/DECISIONS.md H2). Not measured for this kernel yet."""
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
def _ld(ptr, m, MASKED: tl.constexpr):
    """tl.load of ``ptr``, masked by ``m`` (broadcast; 0 where False) only in a partial step."""
    if MASKED:
        v = tl.load(ptr, mask=m, other=0)
    else:
        v = tl.load(ptr)
    return v


@triton.jit
def _run4(p, m, sh, MASKED: tl.constexpr):
    """Four consecutive int32 words starting at a 2-byte-aligned byte address, each [L, B]: ``p`` [L, B]
    points at the aligned word at or below it, ``sh`` [L, B] is 0 or 16 (the address's low bits times 8).
    Five aligned 32-bit loads, four funnel shifts."""
    a0 = _ld(p, m, MASKED)
    a1 = _ld(p + 1, m, MASKED)
    a2 = _ld(p + 2, m, MASKED)
    a3 = _ld(p + 3, m, MASKED)
    a4 = _ld(p + 4, m, MASKED)
    return _funnel(a0, a1, sh), _funnel(a1, a2, sh), _funnel(a2, a3, sh), _funnel(a3, a4, sh)


@triton.jit
def _x4(p, m, MASKED: tl.constexpr):
    """Activation words p + 0..3 (``p`` [L, B], 16-byte aligned: one vector load) as four [L, B]."""
    x = _ld(p[:, :, None] + tl.arange(0, 4)[None, None, :], m[:, :, None], MASKED)
    even, odd = tl.split(tl.reshape(x, [p.shape[0], p.shape[1], 2, 2]))  # words 0, 2 and 1, 3
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _q6_signed(code):
    """Six-bit codes q (one per byte) -> int8 q - 32 per byte (as words_k._q6_signed)."""
    return (code + 0x60606060) ^ -0x7F7F7F80


@triton.jit
def _q6_k_step(p_ql, p_qh, p_x, p_s, p_dx, p_d, sh, t0, bm, MASKED: tl.constexpr):
    """Σ w·dx·xq of each block of a step, [B]; pointers of lane (a, t0, h) [8, B] (``_q6_k_rows``)."""
    m2 = bm[None, :]
    ql0, ql1, ql2, ql3 = _run4(p_ql, m2, sh, MASKED)
    qh0, qh1, qh2, qh3 = _run4(p_qh, m2, sh, MASKED)
    # qh bits 2t, t = t0 + 2tt: shifted by 2t0 once, then to bits 4-5 of a byte (tt = 0) or already there
    ts = (2 * t0)[:, None]
    qh0 = qh0 >> ts
    qh1 = qh1 >> ts
    qh2 = qh2 >> ts
    qh3 = qh3 >> ts
    part = tl.zeros(sh.shape, tl.float32)
    for tt in tl.static_range(2):
        x0, x1, x2, x3 = _x4(p_x + 16 * tt, m2, MASKED)  # value words 32a + 8t + 4h + 0..3
        # one sub-block's 16 values: low (tt = 0) or high nibbles of ql, bits 2t of qh
        dot = _dp4a(_q6_signed(((ql0 >> (4 * tt)) & 0x0F0F0F0F) | ((qh0 << (4 - 4 * tt)) & 0x30303030)), x0, 0)
        dot = _dp4a(_q6_signed(((ql1 >> (4 * tt)) & 0x0F0F0F0F) | ((qh1 << (4 - 4 * tt)) & 0x30303030)), x1, dot)
        dot = _dp4a(_q6_signed(((ql2 >> (4 * tt)) & 0x0F0F0F0F) | ((qh2 << (4 - 4 * tt)) & 0x30303030)), x2, dot)
        dot = _dp4a(_q6_signed(((ql3 >> (4 * tt)) & 0x0F0F0F0F) | ((qh3 << (4 - 4 * tt)) & 0x30303030)), x3, dot)
        s = _ld(p_s + 4 * tt, m2, MASKED).to(tl.int8, bitcast=True).to(tl.float32)  # scale of sub-block 8a + 2t + h
        dx = _ld(p_dx + 2 * tt, m2, MASKED)  # dx of group 4a + t
        part += s * dx * dot.to(tl.float32)
    d = _ld(p_d.to(tl.pointer_type(tl.float16)), bm, MASKED).to(tl.float32)
    return d * tl.sum(part, axis=0)


@triton.jit
def _q6_k_rows(W, off, XW, DX, grp, full, g_ok, STEP: tl.constexpr, STEP_G: tl.constexpr):
    """Σ over the row's steps of each block slot's terms, [B] (``off`` int64 [B] byte offsets of the first
    step's blocks in W, ``grp`` [B] their first activation groups; STEP bytes / STEP_G groups a step: a
    multiple of 4 bytes, so every slot keeps its 2-byte misalignment from step to step)."""
    q = tl.arange(0, 8)
    a = q // 4
    t0 = (q // 2) % 2
    h = q % 2
    W32 = W.to(tl.pointer_type(tl.int32))
    word0 = (off >> 2)[None, :]
    sh = tl.broadcast_to(((off & 3) * 8).to(tl.int32)[None, :], [8, off.shape[0]])
    # Pointers of lane (a, t0, h), moved by a step each iteration (the lane's part is loop-invariant):
    p_ql = W32 + word0 + (16 * a + 8 * t0 + 4 * h)[:, None]  # ql bytes 64a + 32t0 + 16h + 0..15
    p_qh = W32 + word0 + (32 + 8 * a + 4 * h)[:, None]  # qh bytes 128 + 32a + 16h + 0..15
    p_x = XW + 8 * grp[None, :] + (32 * a + 8 * t0 + 4 * h)[:, None]  # value word 32a + 8t0 + 4h
    p_s = W + off[None, :] + (192 + 8 * a + 2 * t0 + h)[:, None]  # scale of sub-block 8a + 2t0 + h
    p_dx = DX + grp[None, :] + (4 * a + t0)[:, None]  # group 4a + t0
    p_d = W + off + 208  # fp16 d
    all_blocks = g_ok | True
    acc = tl.zeros(off.shape, tl.float32)
    for _ in range(full):
        acc += _q6_k_step(p_ql, p_qh, p_x, p_s, p_dx, p_d, sh, t0, all_blocks, False)
        p_ql += STEP // 4
        p_qh += STEP // 4
        p_x += 8 * STEP_G
        p_s += STEP
        p_dx += STEP_G
        p_d += STEP
    acc += _q6_k_step(p_ql, p_qh, p_x, p_s, p_dx, p_d, sh, t0, g_ok, True)  # the partial step (or nothing)
    return acc


@triton.jit
def _q4_k_step(p_w, p_x, p_blk, p_dx, p_sx, c, bm, MASKED: tl.constexpr):
    """Σ w·dx·xq of each block of a step, [B]; lane c's pointers (``_q4_k_rows``)."""
    m2 = bm[None, :]
    m3 = m2[:, :, None]
    w = _ld(p_w, m3, MASKED)  # qs bytes 32c + 0..31
    dl = tl.sum(_dp4a(w & 0x0F0F0F0F, _ld(p_x, m3, MASKED), 0), axis=2)  # [4, B], sub-block 2c
    dh = tl.sum(_dp4a((w >> 4) & 0x0F0F0F0F, _ld(p_x + 8, m3, MASKED), 0), axis=2)  # sub-block 2c + 1
    # six-bit scales and mins of sub-blocks 2c and 2c + 1 (layout: words_k._k_scale_min)
    w_sc = _ld(p_blk + 1, bm, MASKED)[None, :]
    w_mn = _ld(p_blk + 2, bm, MASKED)[None, :]
    w_lo = _ld(p_blk + 3, bm, MASKED)[None, :]
    dxl = _ld(p_dx, m2, MASKED)
    dxh = _ld(p_dx + 1, m2, MASKED)
    sxl = _ld(p_sx, m2, MASKED).to(tl.float32)
    sxh = _ld(p_sx + 1, m2, MASKED).to(tl.float32)
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
    w0 = _ld(p_blk, bm, MASKED)  # fp16 d, fp16 dmin
    return _half_lo(w0) * tl.sum(a, axis=0) - _half_hi(w0) * tl.sum(b, axis=0)


@triton.jit
def _q4_k_rows(W, off, XW, DX, XS, grp, full, g_ok, STEP: tl.constexpr, STEP_G: tl.constexpr):
    """As _q6_k_rows for Q4_K: 4 lanes a block, lane c reads qs chunk c (module docstring)."""
    c = tl.arange(0, 4)
    i = tl.arange(0, 8)[None, None, :]
    p_blk = W.to(tl.pointer_type(tl.int32)) + (off >> 2)  # [B]: d/dmin, then the 12 scale bytes
    p_w = (p_blk[None, :] + (4 + 8 * c)[:, None])[:, :, None] + i  # qs bytes 32c + 4i, [4, B, 8]
    p_x = (XW + 8 * grp[None, :] + (16 * c)[:, None])[:, :, None] + i  # activation words of the low nibbles
    p_dx = DX + grp[None, :] + (2 * c)[:, None]  # group 2c (low nibbles), 2c + 1 (high)
    p_sx = XS + grp[None, :] + (2 * c)[:, None]
    all_blocks = g_ok | True
    acc = tl.zeros(off.shape, tl.float32)
    for _ in range(full):
        acc += _q4_k_step(p_w, p_x, p_blk, p_dx, p_sx, c, all_blocks, False)
        p_w += STEP // 4
        p_x += 8 * STEP_G
        p_blk += STEP // 4
        p_dx += STEP_G
        p_sx += STEP_G
    acc += _q4_k_step(p_w, p_x, p_blk, p_dx, p_sx, c, g_ok, True)  # the partial step (or nothing)
    return acc


@triton.jit
def _lanes_kernel(XW, DX, XS, W, Y, Bias, Res, N, NB, ROW_BYTES,
                  FMT: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    tl.static_assert((FMT == 12) or (FMT == 14 and G % 2 == 0), "lanes: q4_k, or q6_k with an even G")
    wait_and_release(PDL)  # x (and the residual) come from the kernels before (glmtg/kernels/pdl.py)
    B: tl.constexpr = BLOCK_N * G
    idx = tl.arange(0, B)
    r = idx // G
    g = idx % G
    rows_in = tl.minimum(tl.program_id(0) * BLOCK_N + r, N - 1)  # rows past N read row N - 1, not stored
    off = rows_in.to(tl.int64) * ROW_BYTES + g * TS  # byte offset of each block of the first step
    grp = g * 8  # its first activation group (8 groups of 32 values a 256-value block)
    full = NB // G
    g_ok = (full * G + g) < NB  # the blocks of the last, partial step (none if G divides NB)
    if FMT == 14:
        acc = _q6_k_rows(W, off, XW, DX, grp, full, g_ok, G * TS, G * 8)
    else:
        acc = _q4_k_rows(W, off, XW, DX, XS, grp, full, g_ok, G * TS, G * 8)
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
    """Run the lanes kernel for one token: ``out`` [1, N] (checked by mmvq, as every operand). Q6_K takes
    at least 2 blocks a step (an even number: each block slot then keeps its alignment from step to step)."""
    n = weight.shape[0]
    if fmt_type == 14:
        blocks_per_step = max(blocks_per_step, 2)
    _lanes_kernel[(triton.cdiv(n, block_n),)](
        codes.view(torch.int32), dx, sums, weight, out, out if bias is None else bias,
        out if residual is None else residual, n, nb, weight.shape[1],
        FMT=fmt_type, TS=type_size, BLOCK_N=block_n, G=blocks_per_step, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, PDL=enabled(out.device), num_warps=num_warps, **launch_kwargs(out.device),
    )
