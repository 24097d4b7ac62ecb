"""y = x @ W.T for a few tokens, W in GGUF blocks, by integer dot products (llama.cpp's MMVQ path).

Why: the float path (gemv.py) decodes every weight value to fp32, 7-13 SM instructions a value, which
bounds it by the instruction issue rate well below memory bandwidth for 4-bit types. Here x is quantized
once to int8 per 32 values (q8_1 style: dx = amax / 127, codes rounded to nearest, and each group's code
sum), and each weight block's codes are packed four to an int32 word with word-wide bit operations and
multiplied with dp4a, four multiply-adds an instruction (glmtg/kernels/gguf/words.py). The block and
sub-block scales are applied once to the exact int32 sums.

Numerics: the result differs from an fp32 dot by x's rounding to int8 (|error| <= Σ_groups dx/2 · Σ|w|),
as llama.cpp's MMVQ does; given the quantized x, it is exact up to fp32 accumulation.

Launch: one program covers BLOCK_N rows and all tokens and walks the rows G blocks at a time, the
BLOCK_N x G blocks of a step on one flat axis, one block per thread by default (default_config): every
tensor of a step then has the same layout, so nothing moves between threads inside the loop, and a
block's words are reduced in registers by chained dp4a. Full steps load without masks (rows past N read row
N - 1, tokens past T token T - 1, neither stored); only the last partial step is masked. Each token adds
its activation loads and dp4a, so the cost per weight value grows with T (~T/4 dp4a per 4-bit value).
Instruction counts per weight value, the launch measurements behind ``measured_config`` and what is left:
bench/DECISIONS.md H (bench/gguf_gemv.py --mmvq [--sweep | --sass] remakes them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.formats import GGUF_FORMATS, BlockFormat, get
from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.gemv import (
    GEMV_MAX_TOKENS,
    SUPPORTED_DTYPES,
    check_weight,
    output_for,
    steps_for,
)
from glmtg.kernels.gguf.words import block_dot

# The formats the int8-dot path reads.
MMVQ_FORMATS: tuple[str, ...] = ("q4_0", "q8_0", "q4_k", "q6_k", "q5_0", "iq4_xs", "iq4_nl", "q5_k", "q4_1", "q5_1",
                                   "q2_k", "q3_k")
GROUP: int = 32  # activation values per int8 scale


@triton.jit
def quantize_groups(v):
    """fp32 [GB, 32] groups -> (codes int32 [GB, 32], dx fp32 [GB], code sums int32 [GB]): dx = amax / 127,
    codes = v · (127 / amax) rounded to nearest (0 for an all-zero group)."""
    amax = tl.max(tl.abs(v), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)  # no 1/0 evaluated
    # Round to nearest even by the 1.5 * 2^23 trick (exact for |v| < 2^22); |v * inv| <= 127 (+ rounding).
    q = (v * inv[:, None] + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    return q, amax / 127.0, tl.sum(q, axis=1)


@triton.jit
def _quantize_kernel(X, Q, DX, S, NG, STRIDE_XT, GB: tl.constexpr):
    # One program: GB groups of 32 values of one token.
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GB + tl.arange(0, GB)
    j = tl.arange(0, 32)
    ok = (g < NG)[:, None]
    offs = g[:, None] * 32 + j[None, :]
    v = tl.load(X + t * STRIDE_XT + offs, mask=ok, other=0.0).to(tl.float32)
    q, dx, sums = quantize_groups(v)
    tl.store(Q + t * (NG * 32) + offs, q.to(tl.int8), mask=ok)
    gm = g < NG
    tl.store(DX + t * NG + g, dx, mask=gm)
    tl.store(S + t * NG + g, sums, mask=gm)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] float -> (codes int8 [T, K], dx fp32 [T, K/32], code sums int32 [T, K/32]).

    Per group of 32 values: dx = amax / 127 and codes = round(x / dx) (0 where amax is 0), so that
    x ≈ codes · dx; the code sums serve weight formats with offsets (Σ (q - o)·xq = Σ q·xq - o·Σxq)."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point(),
          lambda: f"x must be a 2-D float tensor [T, K], got {describe(x)}")
    t, k = x.shape
    check(k % GROUP == 0, lambda: f"x: K={k} is not a multiple of {GROUP}")
    ng = k // GROUP
    codes = torch.empty((t, k), dtype=torch.int8, device=x.device)
    dx = torch.empty((t, ng), dtype=torch.float32, device=x.device)
    sums = torch.empty((t, ng), dtype=torch.int32, device=x.device)
    if t == 0 or k == 0:
        return codes, dx, sums
    x = x if x.stride(1) == 1 else x.contiguous()
    gb = 32
    _quantize_kernel[(t, triton.cdiv(ng, gb))](x, codes, dx, sums, ng, x.stride(0), GB=gb, num_warps=4)
    return codes, dx, sums


@triton.jit
def _mmvq_kernel(XW, DX, XS, W, Y, T, N, NB, NG, ROW_BYTES, STRIDE_YT,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    GPB: tl.constexpr = BS // 32  # activation groups per weight block
    B: tl.constexpr = BLOCK_N * G
    # One flat axis over the step's BLOCK_N x G blocks (words.py: one layout for every tensor of a step).
    idx = tl.arange(0, B)
    r = idx // G
    g = idx % G
    tt = tl.arange(0, BLOCK_T)
    rows_in = tl.minimum(tl.program_id(0) * BLOCK_N + r, N - 1)
    blk = W + rows_in.to(tl.int64) * ROW_BYTES + g * TS  # [B]
    # Activation group of each block's first group, [BT, B]. One token: the row term is 0.
    if BLOCK_T == 1:
        tok = (idx * 0)[None, :]
    else:
        tok = tl.minimum(tt, T - 1)[:, None]
    grp = tok * NG + (g * GPB)[None, :]
    x_all = grp >= 0  # all True; the full steps' masks fold away
    all_blocks = idx >= 0
    acc = tl.zeros((BLOCK_T, B), dtype=tl.float32)
    full = NB // G
    for _ in range(full):
        acc += block_dot(blk, all_blocks, XW + grp * 8, DX + grp, XS + grp, x_all, FMT)
        blk += G * TS
        grp += G * GPB
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + g) < NB
        acc += block_dot(blk, g_ok, XW + grp * 8, DX + grp, XS + grp, x_all & g_ok[None, :], FMT)
    y = tl.sum(tl.reshape(acc, [BLOCK_T, BLOCK_N, G]), axis=2)  # [BLOCK_T, BLOCK_N]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = Y + tt[:, None] * STRIDE_YT + rows[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(tt < T)[:, None] & (rows < N)[None, :])


def mmvq_format(fmt: str | int, what: str = "fmt") -> BlockFormat:
    """The GGUF block format ``fmt``; ValueError naming ``what`` if it has no int8-dot path."""
    f = get(fmt, what=what, allowed=GGUF_FORMATS)
    check(f.name in MMVQ_FORMATS, lambda: f"{what}: no int8-dot path for {f.name} (have: {MMVQ_FORMATS})")
    return f


def default_config(n: int, nb: int) -> tuple[int, int, int]:
    """(block_n, blocks per step G, num_warps) for ``n`` rows of ``nb`` blocks: one block per thread and
    step (32 x num_warps blocks a step: a row's blocks, or several rows when a row has fewer), and fewer
    warps while the launch would have under ~1000 programs (small projections then still fill every SM).
    Reasoned: the shapes ``measured_config`` covers take its measured launch instead."""
    warps = 4
    while True:
        g = min(triton.next_power_of_2(nb), 32 * warps)
        block_n = max(1, 32 * warps // g)
        if warps == 1 or triton.cdiv(n, block_n) >= 1024:
            return block_n, g, warps
        warps //= 2


def measured_config(block_size: int, n: int, k: int) -> tuple[int, int, int] | None:
    """(block_n, values_per_step, num_warps) measured fastest on an H200 at the GLM-4.5-Air decode shapes, or
    None where no measurement covers the shape (``default_config`` then): for large matrices (n and k >=
    4096), 32-value blocks take 4 rows x 4096 values a step on 4 warps, 256-value blocks one row x 1024
    values on one warp (many small programs in flight). Numbers: bench/DECISIONS.md H2."""
    if n < 4096 or k < 4096:
        return None
    return (4, 4096, 4) if block_size == 32 else (1, 1024, 1)



def _checked_quantized(q: object, t: int, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``q`` if it is a quantize_activation result for x [t, k] on ``device``, else ValueError."""
    want = ((torch.int8, (t, k)), (torch.float32, (t, k // GROUP)), (torch.int32, (t, k // GROUP)))
    check(isinstance(q, tuple) and len(q) == 3 and all(
        isinstance(v, torch.Tensor) and v.dtype == dt and tuple(v.shape) == sh and v.device == device
        and v.is_contiguous() for v, (dt, sh) in zip(q, want)),
        lambda: f"quantized must be quantize_activation(x)'s (codes, dx, sums) for x {(t, k)} on {device}")
    return q


def mmvq(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
         block_n: int | None = None, values_per_step: int | None = None, num_warps: int | None = None,
         quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32) @ dequant(weight).T -> [T, N] in x's dtype, by int8 dot products.

    Same contract as ``gemv.quant_matvec`` (weight uint8 [N, row_bytes] of ``fmt`` blocks, contiguous,
    16-byte aligned; T <= GEMV_MAX_TOKENS; launch knobs ``block_n``, ``values_per_step``, ``num_warps``),
    except that x is first rounded to int8 per 32 values (``quantize_activation``). ``quantized``: that
    rounding done already (quantize_activation(x)'s result), e.g. once for several weights read with the
    same x (q/k/v, gate/up); then one kernel launch per call instead of two."""
    f = mmvq_format(fmt)
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, k = x.shape
    check(t <= GEMV_MAX_TOKENS, lambda: f"x has {t} tokens; mmvq takes at most {GEMV_MAX_TOKENS}")
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * f.block_size == k, lambda: f"weight rows hold {nb * f.block_size} {f.name} values but x has K={k}")
    out = output_for(out, (t, n), x)
    auto_n, auto_g, auto_warps = default_config(n, nb)
    auto_values = auto_g * f.block_size
    # A GPU measurement; the interpreter (a CPU) keeps the default, whose larger programs it runs faster.
    measured = measured_config(f.block_size, n, nb * f.block_size) if x.is_cuda else None
    if measured is not None:
        auto_n, auto_values, auto_warps = measured
    block_n = auto_n if block_n is None else block_n
    values_per_step = auto_values if values_per_step is None else values_per_step
    num_warps = auto_warps if num_warps is None else num_warps
    check_power_of_two("block_n", block_n)
    check_power_of_two("values_per_step", values_per_step)
    check_power_of_two("num_warps", num_warps)
    if t == 0 or n == 0:
        return out
    codes, dx, sums = quantize_activation(x) if quantized is None else _checked_quantized(quantized, t, k, x.device)
    _mmvq_kernel[(triton.cdiv(n, block_n),)](
        codes.view(torch.int32), dx, sums, weight, out, t, n, nb, k // GROUP, weight.shape[1], out.stride(0),
        FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, BLOCK_T=triton.next_power_of_2(t),
        BLOCK_N=block_n, G=steps_for(f.block_size, values_per_step), num_warps=num_warps,
    )
    return out
