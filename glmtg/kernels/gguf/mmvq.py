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

Fewer launches around it: the bias and the residual add are the kernel's epilogue (rounded as torch's
unfused adds); ``out`` may be a column slice of a wider buffer (several weights side by side, no cat); x's
int8 rounding (activation.py) is remembered per tensor, so weights that read the same x round it once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.formats import GGUF_FORMATS, BlockFormat, get
from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.activation import (  # noqa: F401 (quantize_activation, quantize_groups: old import path)
    GROUP,
    checked_quantized,
    quantize_activation,
    quantize_groups,
    quantize_once,
)
from glmtg.kernels.gguf import mmvq_lanes, mmvq_lanes32
from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS, SUPPORTED_DTYPES, check_weight, steps_for
from glmtg.kernels.gguf.words import block_dot
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

# The formats the int8-dot path reads.
MMVQ_FORMATS: tuple[str, ...] = ("q4_0", "q8_0", "q4_k", "q6_k", "q5_0", "iq4_xs", "iq4_nl", "q5_k", "q4_1", "q5_1",
                                   "q2_k", "q3_k")


@triton.jit
def _mmvq_kernel(XW, DX, XS, W, Y, Bias, Res, T, N, NB, NG, ROW_BYTES, STRIDE_YT, STRIDE_RT,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    wait_and_release(PDL)  # x (and the residual) come from the kernels before (glmtg/kernels/pdl.py)
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
    ok = (tt < T)[:, None] & (rows < N)[None, :]
    # The epilogue rounds as torch's unfused y = y + bias; y = y + residual: each sum in fp32 (exact
    # operands), rounded to the output dtype before the next.
    y = y.to(Y.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(Bias + rows, mask=rows < N, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(Y.dtype.element_ty)
    if HAS_RES:
        # Res may be Y itself (out += W x): each element is read and written by this one program, the load
        # first.
        r = tl.load(Res + tt[:, None] * STRIDE_RT + rows[None, :], mask=ok, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + tt[:, None] * STRIDE_YT + rows[None, :], y, mask=ok)


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



def _matrix(name: str, v: object, shape: tuple[int, int], x: torch.Tensor, distinct_rows: bool) -> torch.Tensor:
    """``v`` checked to be a [T, N] tensor in x's dtype on x's device with unit column stride (a column
    slice of a wider buffer is fine); ``distinct_rows``: rows must not overlap (an output)."""
    t, n = shape
    check(isinstance(v, torch.Tensor) and tuple(v.shape) == shape and v.dtype == x.dtype and v.device == x.device
          and (n <= 1 or v.stride(1) == 1) and (not distinct_rows or t <= 1 or v.stride(0) >= n),
          lambda: f"{name} must be a {x.dtype} tensor {shape} on {x.device} with unit column stride"
                  f"{' and rows at least N apart' if distinct_rows else ''}, got {describe(v)}"
                  f"{' strides ' + str(v.stride()) if isinstance(v, torch.Tensor) else ''}")
    return v


def _span(v: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a [T, N] tensor with unit column stride can touch."""
    start = v.data_ptr()
    return start, start + ((v.shape[0] - 1) * v.stride(0) + v.shape[1]) * v.element_size()


def epilogue_operands(x: torch.Tensor, t: int, n: int, out: torch.Tensor | None, bias: torch.Tensor | None,
                      residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, residual) of a [T, N] product of x checked (ValueError naming them), ``out`` allocated when None:
    out with unit column stride and distinct rows, bias a contiguous [N] of x's dtype, residual [T, N] that
    is ``out`` itself or does not overlap it (the kernel reads and writes each element once, in one program).
    Shared by the GGUF product kernels with this epilogue (mmvq, mmq)."""
    out = torch.empty((t, n), dtype=x.dtype, device=x.device) if out is None else _matrix("out", out, (t, n), x, True)
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,) and bias.dtype == x.dtype
              and bias.device == x.device and (n <= 1 or bias.stride(0) == 1),
              lambda: f"bias must be a contiguous {x.dtype} tensor ({n},) on {x.device}, got {describe(bias)}")
    if residual is not None:
        residual = _matrix("residual", residual, (t, n), x, False)
        same = residual.data_ptr() == out.data_ptr() and (t <= 1 or residual.stride(0) == out.stride(0))
        if t and n and not same:
            (r0, r1), (o0, o1) = _span(residual), _span(out)
            check(r1 <= o0 or o1 <= r0, "residual overlaps out without being out (the kernel would race)")
    return out, residual


def mmvq(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         block_n: int | None = None, values_per_step: int | None = None, num_warps: int | None = None,
         quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
         variant: str | None = None) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32) @ dequant(weight).T (+ bias) (+ residual) -> [T, N] in x's dtype, by
    int8 dot products, one launch.

    Same contract as ``gemv.quant_matvec`` (weight uint8 [N, row_bytes] of ``fmt`` blocks, contiguous,
    16-byte aligned; T <= GEMV_MAX_TOKENS; launch knobs ``block_n``, ``values_per_step``, ``num_warps``),
    except that x is first rounded to int8 per 32 values (activation.quantize_activation).

    ``out``: [T, N] in x's dtype with unit column stride; rows may be further apart than N, so a column
    slice of a wider [T, N_total] buffer takes several weights' outputs side by side (no torch.cat).
    ``bias`` [N] and ``residual`` [T, N] (x's dtype; residual with unit column stride, may be ``out``
    itself: out += W x) are added in the epilogue with torch's roundings: y = round(acc), then
    y = round(y + bias), then y = round(y + residual), each sum in fp32 — bit for bit the unfused torch
    sequence on this kernel's y. A residual that overlaps out other than being out is refused.

    ``quantized``: x's rounding done already (quantize_activation(x) or silu_mul_quantize's result);
    then x is read only for its shape, dtype and device. Left None, x's rounding is looked up in the
    activation memo (activation.quantized_of: the same tensor, unmodified) and otherwise done here and
    remembered, so q/k/v or gate/up calls on one x round it once.

    ``variant``: which kernel, "base", "lanes" or "lanes-wide" (mmvq_lanes.py: Q6_K and Q4_K at T = 1;
    anything else runs the base kernel), or "lanes-q4", "-narrow", "-wide", "-auto" ("lanes", and
    Q4_0 / Q5_0 / Q8_0 at T = 1 with rows of an even number of blocks by mmvq_lanes32.py); None: the
    process-wide choice (GLMTG_MMVQ_VARIANT, default "lanes"). The
    launch knobs mean the same for both; the lanes kernel has its own defaults."""
    f = mmvq_format(fmt)
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, k = x.shape
    check(t <= GEMV_MAX_TOKENS, lambda: f"x has {t} tokens; mmvq takes at most {GEMV_MAX_TOKENS}")
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * f.block_size == k, lambda: f"weight rows hold {nb * f.block_size} {f.name} values but x has K={k}")
    given_out = out is not None
    out, residual = epilogue_operands(x, t, n, out, bias, residual)
    lanes = mmvq_lanes.lanes_split(variant, f.name, t)
    lanes32 = mmvq_lanes32.lanes32_split(mmvq_lanes.resolve(variant), f.name, t, nb)
    auto_n, auto_g, auto_warps = default_config(n, nb)
    auto_values = auto_g * f.block_size
    # A GPU measurement; the interpreter (a CPU) keeps the default, whose larger programs it runs faster.
    measured = measured_config(f.block_size, n, nb * f.block_size) if x.is_cuda else None
    if measured is not None:
        auto_n, auto_values, auto_warps = measured
    if lanes:
        auto_n, auto_values, auto_warps = mmvq_lanes.default_config(f.name, lanes)
    if lanes32:
        auto_n, auto_values, auto_warps = mmvq_lanes32.default_config(lanes32)
    block_n = auto_n if block_n is None else block_n
    values_per_step = auto_values if values_per_step is None else values_per_step
    num_warps = auto_warps if num_warps is None else num_warps
    check_power_of_two("block_n", block_n)
    check_power_of_two("values_per_step", values_per_step)
    check_power_of_two("num_warps", num_warps)
    if t == 0 or n == 0:
        return out
    codes, dx, sums = quantize_once(x) if quantized is None else checked_quantized(quantized, t, k, x.device)
    if lanes32:
        mmvq_lanes32.launch(codes, dx, sums, weight, out, bias, residual, f.gguf_type, f.type_size, nb, block_n,
                            steps_for(f.block_size, values_per_step), num_warps, lanes32)
    elif lanes:
        mmvq_lanes.launch(codes, dx, sums, weight, out, bias, residual, f.gguf_type, f.type_size, nb, block_n,
                          steps_for(f.block_size, values_per_step), num_warps, lanes)
    else:
        _mmvq_kernel[(triton.cdiv(n, block_n),)](
            codes.view(torch.int32), dx, sums, weight, out, out if bias is None else bias,
            out if residual is None else residual, t, n, nb, k // GROUP, weight.shape[1], out.stride(0),
            out.stride(0) if residual is None else residual.stride(0),
            FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, BLOCK_T=triton.next_power_of_2(t),
            BLOCK_N=block_n, G=steps_for(f.block_size, values_per_step), HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, PDL=enabled(x.device), num_warps=num_warps, **launch_kwargs(x.device),
        )
    if given_out:
        # written behind torch's back: bump its version so a remembered quantization of it (the memo)
        # no longer matches
        torch.autograd.graph.increment_version(out)
    return out
