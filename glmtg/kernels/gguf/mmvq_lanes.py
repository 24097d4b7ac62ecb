"""The "lanes" variants of the int8-dot GEMV (mmvq.py) for Q6_K and Q4_K at one token: a block is read by
lanes that sit next to each other in a warp, each owning one fixed slice of it, with full aligned 32-bit
(Q4_K: 16-byte) loads, so a warp's load instruction spans few blocks and few cache lines.

Why: the base kernel (mmvq._mmvq_kernel, words_k's decoders) leaves the lane layout to Triton. For Q6_K's
2-byte-aligned 210-byte blocks its words are assembled from 16-bit loads, and the compiled layout puts
neighbouring lanes on different blocks (4 blocks a warp instruction at the measured launch), so each load
instruction carries 64 useful bytes over several lines of several blocks: the kernel is bound by load
instructions, not by DRAM (bench/DECISIONS.md H2). Here the tile of a step is [lanes of a block, E, B]
(B = block_n x G blocks), the lane axes first: Triton's coalescing orders lanes over a block's slices,
then over blocks, and a lane's words sit on a register axis (checked in the sm_90 TTGIR: no layout
conversion inside the loop). Two widths, E = 1 ("lanes") and E = 2 ("lanes-wide", twice the lanes a block,
half the words a lane; the lanes' integer dots are summed across the pair before any scale):

- Q6_K, lane (a, t0, h) for a, t0, h in {0, 1}: the 16 ql bytes 64a + 32t0 + 16h + 0..15 and the 16 qh
  bytes 128 + 32a + 16h + 0..15, i.e. the 32 values of sub-blocks 8a + 2t + h for t = t0 and t0 + 2
  (value 128a + 32t + 16h + j, activation group 4a + t). A block is only 2-byte aligned, so a run of
  NW = 4 / E words is read as NW + 1 aligned 32-bit words (the address rounded down to 4) and
  funnel-shifted by 0 or 16 bits (one ``shf.r.clamp`` a word). 8 · E lanes a block. A step moves by an even
  number of blocks (a multiple of 4 bytes), so each block slot keeps its shift from step to step.
- Q4_K (4-byte-aligned 144-byte blocks), lane (c, e): 32 / E bytes of qs chunk c (values 64c + j and
  64c + 32 + j: sub-blocks 2c and 2c + 1) as 16-byte vector loads, its scale and min decoded per lane.
  4 · E lanes a block.

Every address is a loop-invariant lane part plus a per-step offset: the lanes' pointers are set up once a
row, and step k adds the same scalar to all of them; full steps load unmasked, only the last partial step
is masked.

Numerics: the same integer dot products as the base path (Q6_K: Σ (q - 32)·xq over one 16-value sub-block,
here summed as -32·Σxq + Σ q·xq by dp4a on the raw codes, the same int32; Q4_K: Σ q·xq over one 32-value
sub-block, and its Σxq), and the same products in the same order
((scale · dx) · dot, (min · dx) · Σxq, the fp16 d (and dmin) applied once to a block's sum); only the fp32
summation order differs (within a lane, across the lanes of a block, then the blocks). So the results equal
the base variant's up to fp32 summation order.

Scope: one token (T = 1: decode at batch 1: the output head, the projections); ``mmvq`` sends T > 1 and
the other formats to the base kernel. Selected by mmvq's ``variant`` argument or GLMTG_MMVQ_VARIANT
("lanes", the default since it measured faster on every Air shape (bench/DECISIONS.md H8), "base" or
"lanes-wide"; ``variant_mode`` switches it for a block).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from glmtg.kernels.gguf.decode import _PTX
from glmtg.kernels.gguf.decode_kquants import _half_hi, _half_lo
from glmtg.kernels.gguf.words_common import _dp4a
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release
from glmtg.switch import ModeSwitch

# "lanes-q4*": "lanes" for Q6_K / Q4_K, and mmvq_lanes32.py's kernel (L = 2, 1, 4, per format) for Q4_0,
# Q5_0 and Q8_0 (for A/B: bench/gguf_gemv.py --mmvq-variants)
VARIANTS: tuple[str, ...] = ("base", "lanes", "lanes-wide", "lanes-q4", "lanes-q4-narrow", "lanes-q4-wide",
                             "lanes-q4-auto")
LANES_FORMATS: tuple[str, ...] = ("q6_k", "q4_k")  # the formats the lanes variants read
# E, lanes sharing one lane's slice of a block (module docstring)
_SPLIT = {"lanes": 1, "lanes-wide": 2, "lanes-q4": 1, "lanes-q4-narrow": 1, "lanes-q4-wide": 1,
          "lanes-q4-auto": 1}
_switch = ModeSwitch("GLMTG_MMVQ_VARIANT (the mmvq kernel variant)", VARIANTS,
                     os.environ.get("GLMTG_MMVQ_VARIANT", "lanes"))
set_variant = _switch.set
variant_mode = _switch.scoped  # ``with mmvq_lanes.variant_mode("lanes"): ...``


def current_variant() -> str:
    """The process-wide variant (GLMTG_MMVQ_VARIANT, or as set since)."""
    return _switch.value


def lanes_split(variant: str | None, fmt_name: str, tokens: int) -> int:
    """E (1 or 2) if mmvq runs the lanes kernel for ``fmt_name`` at ``tokens`` under ``variant`` (None: the
    process-wide one), else 0 (the base kernel); ValueError naming ``variant`` if it is not one of VARIANTS."""
    v = resolve(variant)
    return _SPLIT.get(v, 0) if fmt_name in LANES_FORMATS and tokens == 1 else 0


def resolve(variant: str | None) -> str:
    """``variant``, or the process-wide one for None; ValueError naming ``variant`` if not one of VARIANTS."""
    v = _switch.value if variant is None else variant
    if v not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return v


def lanes_per_block(fmt_name: str, split: int) -> int:
    """Lanes that read one block: Q6_K 8 · E, Q4_K 4 · E."""
    return (8 if fmt_name == "q6_k" else 4) * split


def default_config(fmt_name: str, split: int) -> tuple[int, int, int]:
    """(block_n, values per step, num_warps): one row a program on one warp, as many 256-value blocks a step
    as fill the warp's 32 lanes (Q6_K 4 / E, Q4_K 8 / E; Q6_K at least 2). Reasoned from the base kernel's
    measured launch for these formats (one row, one warp: bench/DECISIONS.md H2); not measured for this
    kernel yet."""
    return 1, max(2, 32 // lanes_per_block(fmt_name, split)) * 256, 1


@triton.jit
def store_row(y, Y, Bias, Res, N, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """Store a program's BLOCK_N fp32 row sums of a one-token product, rounded as mmvq's epilogue (torch's
    unfused y + bias, then + residual). Res may be Y itself: each row is read, then written, by this program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    y = y.to(Y.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(Bias + rows, mask=ok, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)).to(Y.dtype.element_ty)
    if HAS_RES:
        res = tl.load(Res + rows, mask=ok, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + rows, y, mask=ok)


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
def _run(p, m, sh, NW: tl.constexpr, MASKED: tl.constexpr):
    """NW (4 or 2) consecutive int32 words starting at a 2-byte-aligned byte address, as [..., NW] (the
    words on a register axis): ``p`` points at the aligned word at or below it, ``sh`` is 0 or 16 (the
    address's low bits times 8). NW + 1 aligned 32-bit loads and NW funnel shifts."""
    a0 = _ld(p, m, MASKED)
    a1 = _ld(p + 1, m, MASKED)
    a2 = _ld(p + 2, m, MASKED)
    w0 = _funnel(a0, a1, sh)
    w1 = _funnel(a1, a2, sh)
    if NW == 2:
        w = tl.join(w0, w1)
    else:
        a3 = _ld(p + 3, m, MASKED)
        a4 = _ld(p + 4, m, MASKED)
        # join(join(w0, w2), join(w1, w3))[u, v] = w[2u + v]: row-major, the words in order
        w = tl.reshape(tl.join(tl.join(w0, _funnel(a2, a3, sh)), tl.join(w1, _funnel(a3, a4, sh))),
                       [w0.shape[0], w0.shape[1], w0.shape[2], 4])
    return w


@triton.jit
def _q6_k_step(p_ql, p_qh, p_x, p_s, p_dx, p_d, sh, t0, bm, NW: tl.constexpr, MASKED: tl.constexpr):
    """Σ w·dx·xq of each block of a step, [B]; pointers of lane (a, t0, h, e) [8, E, B] (``_q6_k_rows``)."""
    m3 = bm[None, None, :]
    ql = _run(p_ql, m3, sh, NW, MASKED)  # [8, E, B, NW]
    qh = _run(p_qh, m3, sh, NW, MASKED)
    # qh bits 2t, t = t0 + 2tt: shifted by 2t0 once, then to bits 4-5 of a byte (tt = 0) or already there
    qh = qh >> (2 * t0)[:, None, None, None]
    m2 = bm[None, :]
    part = tl.zeros([p_s.shape[0], p_s.shape[1]], tl.float32)
    for tt in tl.static_range(2):
        x = _ld(p_x[:, :, :, None] + 16 * tt + tl.arange(0, NW)[None, None, None, :], m3[:, :, :, None], MASKED)
        # one sub-block's 16 values: low (tt = 0) or high nibbles of ql, bits 2t of qh; the codes q in
        # [0, 64) are non-negative int8, so Σ (q - 32)·xq = Σ q·xq - 32·Σxq (Σxq by dp4a with 0x01010101)
        code = ((ql >> (4 * tt)) & 0x0F0F0F0F) | ((qh << (4 - 4 * tt)) & 0x30303030)
        dot = _dp4a(code, x, _dp4a(x * 0 - 0x1F1F1F20, x, 0))  # 0xE0E0E0E0: -32 in each byte, -32·Σxq first
        dot = tl.sum(tl.sum(dot, axis=3), axis=1)  # [8, B]: exact int32
        s = _ld(p_s + 4 * tt, m2, MASKED).to(tl.int8, bitcast=True).to(tl.float32)  # sub-block 8a + 2t + h
        dx = _ld(p_dx + 2 * tt, m2, MASKED)  # dx of group 4a + t
        part += s * dx * dot.to(tl.float32)
    d = _ld(p_d.to(tl.pointer_type(tl.float16)), bm, MASKED).to(tl.float32)
    return d * tl.sum(part, axis=0)


@triton.jit
def _q6_k_rows(W, off, XW, DX, grp, full, NB, G: tl.constexpr, E: tl.constexpr):
    """Σ over the row's steps of each block slot's terms, [B] (``off`` int64 [B] byte offsets of the first
    step's blocks in W, ``grp`` [B] their first activation groups; G even, so a step is a multiple of 4 bytes
    and every slot keeps its 2-byte misalignment from step to step). E lanes share a lane's 4-word runs."""
    NW: tl.constexpr = 4 // E
    STEP: tl.constexpr = G * 210
    q = tl.arange(0, 8)
    a = q // 4
    t0 = (q // 2) % 2
    h = q % 2
    ew = (NW * tl.arange(0, E))[None, :, None]  # the lane's first word of the run
    W32 = W.to(tl.pointer_type(tl.int32))
    word0 = (off >> 2)[None, None, :]
    sh = tl.broadcast_to(((off & 3) * 8).to(tl.int32)[None, None, :], [8, E, off.shape[0]])
    # Pointers of lane (a, t0, h, e), moved by a step each iteration (the lane's part is loop-invariant):
    p_ql = W32 + word0 + (16 * a + 8 * t0 + 4 * h)[:, None, None] + ew  # ql bytes 64a + 32t0 + 16h + 0..15
    p_qh = W32 + word0 + (32 + 8 * a + 4 * h)[:, None, None] + ew  # qh bytes 128 + 32a + 16h + 0..15
    p_x = XW + 8 * grp[None, None, :] + (32 * a + 8 * t0 + 4 * h)[:, None, None] + ew  # value word 32a + 8t0 + 4h
    p_s = W + off[None, :] + (192 + 8 * a + 2 * t0 + h)[:, None]  # scale of sub-block 8a + 2t0 + h, [8, B]
    p_dx = DX + grp[None, :] + (4 * a + t0)[:, None]  # group 4a + t0
    p_d = W + off + 208  # fp16 d, [B]
    acc = tl.zeros(off.shape, tl.float32)
    for k in range(full):  # step k: every pointer moves by a scalar (the same for all lanes)
        acc += _q6_k_step(p_ql + k * (STEP // 4), p_qh + k * (STEP // 4), p_x + k * (64 * G), p_s + k * STEP,
                          p_dx + k * (8 * G), p_d + k * STEP, sh, t0, off >= 0, NW, False)
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + tl.arange(0, off.shape[0]) % G) < NB
        acc += _q6_k_step(p_ql + full * (STEP // 4), p_qh + full * (STEP // 4), p_x + full * (64 * G),
                          p_s + full * STEP, p_dx + full * (8 * G), p_d + full * STEP, sh, t0, g_ok, NW, True)
    return acc


@triton.jit
def _q4_k_step(p_w, p_x, p_blk, p_dx, p_sx, c, bm, NH: tl.constexpr, MASKED: tl.constexpr):
    """Σ w·dx·xq of each block of a step, [B]; lane (c, e)'s pointers (``_q4_k_rows``)."""
    m4 = bm[None, None, :, None]
    m = 0x0F0F0F0F
    w = _ld(p_w, m4, MASKED)  # qs bytes 32c + 16·NH·e + 0..15, [4, E, B, 4]
    dl = _dp4a(w & m, _ld(p_x, m4, MASKED), 0)  # values 64c + 16·NH·e + 0..15 (low nibbles, sub-block 2c)
    dh = _dp4a((w >> 4) & m, _ld(p_x + 8, m4, MASKED), 0)  # + 32 (high nibbles, sub-block 2c + 1)
    if NH == 2:  # the chunk's second 16 bytes
        w = _ld(p_w + 4, m4, MASKED)
        dl = _dp4a(w & m, _ld(p_x + 4, m4, MASKED), dl)
        dh = _dp4a((w >> 4) & m, _ld(p_x + 12, m4, MASKED), dh)
    dl = tl.sum(tl.sum(dl, axis=3), axis=1)  # [4, B]: exact int32
    dh = tl.sum(tl.sum(dh, axis=3), axis=1)
    # six-bit scales and mins of sub-blocks s = 2c + hh (layout: words_k._k_scale_min): for s < 4 (c < 2) the
    # low 6 bits of byte s of the scale / min word; else 4 bits of byte s - 4 of the third word (low nibble
    # scale, high nibble min) and the top 2 bits of byte s - 4 of the first two as bits 4-5
    w_sc = _ld(p_blk + 1, bm, MASKED)[None, :]
    w_mn = _ld(p_blk + 2, bm, MASKED)[None, :]
    w_lo = _ld(p_blk + 3, bm, MASKED)[None, :]
    first = (c < 2)[:, None]
    a_sc = tl.where(first, w_sc, w_lo)
    a_mn = tl.where(first, w_mn, w_lo >> 4)
    m_a = tl.where(first, 0x3F, 0x0F)
    m_b = tl.where(first, 0, 0x30)
    m2 = bm[None, :]
    dxl = _ld(p_dx, m2, MASKED)
    dxh = _ld(p_dx + 1, m2, MASKED)
    sxl = _ld(p_sx, m2, MASKED).to(tl.float32)
    sxh = _ld(p_sx + 1, m2, MASKED).to(tl.float32)
    a = tl.zeros(dxl.shape, tl.float32)
    b = tl.zeros(dxl.shape, tl.float32)
    for hh in tl.static_range(2):
        sh8 = (((2 * c + hh) % 4) * 8)[:, None]
        sc = ((a_sc >> sh8) & m_a) | ((w_sc >> (sh8 + 2)) & m_b)
        mn = ((a_mn >> sh8) & m_a) | ((w_mn >> (sh8 + 2)) & m_b)
        if hh == 0:
            a += sc.to(tl.float32) * dxl * dl.to(tl.float32)
            b += mn.to(tl.float32) * dxl * sxl
        else:
            a += sc.to(tl.float32) * dxh * dh.to(tl.float32)
            b += mn.to(tl.float32) * dxh * sxh
    dd = _ld(p_blk, bm, MASKED)  # fp16 d, fp16 dmin
    return _half_lo(dd) * tl.sum(a, axis=0) - _half_hi(dd) * tl.sum(b, axis=0)


@triton.jit
def _q4_k_rows(W, off, XW, DX, XS, grp, full, NB, G: tl.constexpr, E: tl.constexpr):
    """As _q6_k_rows for Q4_K: lane (c, e) reads 32 / E bytes of qs chunk c (module docstring)."""
    NH: tl.constexpr = 2 // E  # 16-byte halves of the chunk a lane reads
    STEP: tl.constexpr = G * 144
    c = tl.arange(0, 4)
    i = (16 * NH // 4 * tl.arange(0, E))[None, :, None, None] + tl.arange(0, 4)[None, None, None, :]  # [1, E, 1, 4]
    p_blk = W.to(tl.pointer_type(tl.int32)) + (off >> 2)  # [B]: d/dmin, then the 12 scale bytes
    p_w = p_blk[None, None, :, None] + (4 + 8 * c)[:, None, None, None] + i  # qs words 8c + 4·NH·e + 0..3
    p_x = XW + 8 * grp[None, None, :, None] + (16 * c)[:, None, None, None] + i  # value words 16c + 4·NH·e + ..
    p_dx = DX + grp[None, :] + (2 * c)[:, None]  # group 2c (low nibbles), 2c + 1 (high)
    p_sx = XS + grp[None, :] + (2 * c)[:, None]
    acc = tl.zeros(off.shape, tl.float32)
    for k in range(full):  # step k: every pointer moves by a scalar (the same for all lanes)
        acc += _q4_k_step(p_w + k * (STEP // 4), p_x + k * (64 * G), p_blk + k * (STEP // 4), p_dx + k * (8 * G),
                          p_sx + k * (8 * G), c, off >= 0, NH, False)
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + tl.arange(0, off.shape[0]) % G) < NB
        acc += _q4_k_step(p_w + full * (STEP // 4), p_x + full * (64 * G), p_blk + full * (STEP // 4),
                          p_dx + full * (8 * G), p_sx + full * (8 * G), c, g_ok, NH, True)
    return acc


@triton.jit
def _lanes_kernel(XW, DX, XS, W, Y, Bias, Res, N, NB, ROW_BYTES,
                  FMT: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, E: tl.constexpr = 1, PDL: tl.constexpr = False):
    tl.static_assert((FMT == 12) or (FMT == 14 and G % 2 == 0), "lanes: q4_k, or q6_k with an even G")
    tl.static_assert((E == 1) or (E == 2), "lanes: E is 1 or 2")
    wait_and_release(PDL)  # x (and the residual) come from the kernels before (glmtg/kernels/pdl.py)
    B: tl.constexpr = BLOCK_N * G
    idx = tl.arange(0, B)
    r = idx // G
    g = idx % G
    rows_in = tl.minimum(tl.program_id(0) * BLOCK_N + r, N - 1)  # rows past N read row N - 1, not stored
    off = rows_in.to(tl.int64) * ROW_BYTES + g * TS  # byte offset of each block of the first step
    grp = g * 8  # its first activation group (8 groups of 32 values a 256-value block)
    full = NB // G
    if FMT == 14:
        acc = _q6_k_rows(W, off, XW, DX, grp, full, NB, G, E)
    else:
        acc = _q4_k_rows(W, off, XW, DX, XS, grp, full, NB, G, E)
    store_row(tl.sum(tl.reshape(acc, [BLOCK_N, G]), axis=1), Y, Bias, Res, N, BLOCK_N, HAS_BIAS, HAS_RES)


def launch(codes: torch.Tensor, dx: torch.Tensor, sums: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
           bias: torch.Tensor | None, residual: torch.Tensor | None, fmt_type: int, type_size: int, nb: int,
           block_n: int, blocks_per_step: int, num_warps: int, split: int) -> None:
    """Run the lanes kernel for one token: ``out`` [1, N] (checked by mmvq, as every operand), ``split`` E
    from ``lanes_split``. Q6_K takes
    at least 2 blocks a step (an even number: each block slot then keeps its alignment from step to step)."""
    n = weight.shape[0]
    if fmt_type == 14:
        blocks_per_step = max(blocks_per_step, 2)
    _lanes_kernel[(triton.cdiv(n, block_n),)](
        codes.view(torch.int32), dx, sums, weight, out, out if bias is None else bias,
        out if residual is None else residual, n, nb, weight.shape[1],
        FMT=fmt_type, TS=type_size, BLOCK_N=block_n, G=blocks_per_step, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, E=split, PDL=enabled(out.device), num_warps=num_warps,
        **launch_kwargs(out.device),
    )
