"""y = x @ W.T for many tokens (prefill), W a GGUF weight tensor dequantized tile by tile into tensor-core dots.

Why: above a few tokens a GEMM is bound by arithmetic, not by weight bytes, so it must run on the tensor
cores. The torch path dequantizes the whole weight to the activations' dtype first (a transient full-
precision copy per call: 1.2 GB for the output head) and then calls cuBLAS. Here each program decodes a
[BLOCK_N, BLOCK_K] tile of W's blocks in registers with the same block decoders the GEMV uses
(``decode.decode_blocks``, bit-exact fp32 values), rounds it to the dot dtype and feeds ``tl.dot`` with an
x tile [BLOCK_M, BLOCK_K]; the dequantized matrix never exists in memory.

Numerics:
- fp16 / bf16 x: the decoded weights are rounded to x's dtype (as the torch path's dequantize-to-x.dtype
  does), products summed in fp32, the result rounded once to x's dtype.
- fp32 x: tiles stay fp32 and the dot runs with ``input_precision="ieee"`` (exact fp32 products, no tf32
  rounding, no tensor cores). fp32 activations are the checking path (tests, CPU runs), not the fast one,
  so exactness wins over speed there; the model runs bf16.
- epilogue as ``mmvq``: y = round(acc); y = round(y + bias); y = round(y + residual), each sum in fp32.

Layout: one program per (m-tile, n-tile), the tiles walked in groups of GROUP_M m-tiles per n column so
that neighbouring programs share W and x tiles in L2. The K loop steps G blocks (BLOCK_K = G x BS values);
full steps load without masks (W rows past N read row N - 1, x rows past T read row T - 1, neither stored),
only the last partial step is masked. Launch choices: ``default_config`` (reasoned, not yet measured:
bench/gguf_gemm.py times them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.decode import decode_blocks
from glmtg.kernels.gguf.gemv import SUPPORTED_DTYPES, check_weight, decoded_format
from glmtg.kernels.gguf.mmvq import epilogue_operands
from glmtg.kernels.gguf.tables import lookup_table

# ---------------------------------------------------------------------------------------------- kernel


@triton.jit
def _weight_tile(blk, mask, Aux, FMT: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The [BLOCK_N, G] blocks at ``blk`` decoded (fp32, bit-exact with gguf): [BLOCK_N, BLOCK_K], value j of
    block g at column g * BS + j (masked blocks give 0)."""
    w = decode_blocks(blk, mask, Aux, FMT, BS)  # fp32 [BLOCK_N, G, BS]
    return tl.reshape(w, [BLOCK_N, BLOCK_K])


@triton.jit
def _dot(a, w, acc, IEEE: tl.constexpr):
    """acc + a @ wᵀ; fp32 operands multiplied exactly (IEEE) rather than in tf32."""
    if IEEE:
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def mmq_tile(acc, acc2, a_ptrs, a_row_ok, w_rows, w_rows2, K, NB, Aux, FMT: tl.constexpr, BS: tl.constexpr,
             TS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr, PAIR: tl.constexpr):
    """(acc + A @ dequant(W)ᵀ, acc2 + A @ dequant(W2)ᵀ) over all K, accumulators [BLOCK_M, BLOCK_N]: the loop
    shared by the dense and the grouped (MoE) kernels. Without PAIR only the first (acc2 comes back as
    given, W2 unread); with it both weights (gate and up) take each A tile, loaded once.

    ``a_ptrs`` [BLOCK_M, BLOCK_K]: pointers to the first K step of the A rows (unit column stride);
    ``a_row_ok`` [BLOCK_M]: rows to read (others read 0); ``w_rows`` / ``w_rows2`` [BLOCK_N]: byte pointers to
    the start of each weight row (rows in range: the caller clamps them). K values = NB blocks."""
    BLOCK_K: tl.constexpr = G * BS
    gg = tl.arange(0, G)
    kk = tl.arange(0, BLOCK_K)
    blk = w_rows[:, None] + (gg * TS)[None, :]  # [BLOCK_N, G]
    blk2 = w_rows2[:, None] + (gg * TS)[None, :]
    all_blocks = tl.full((BLOCK_N, G), True, tl.int1)
    full = NB // G
    for _ in range(full):
        a = tl.load(a_ptrs, mask=a_row_ok[:, None], other=0.0)
        w = _weight_tile(blk, all_blocks, Aux, FMT, BS, BLOCK_N, BLOCK_K)
        acc = _dot(a, w.to(a.dtype), acc, IEEE)  # weights rounded to the activations' dtype
        if PAIR:
            w2 = _weight_tile(blk2, all_blocks, Aux, FMT, BS, BLOCK_N, BLOCK_K)
            acc2 = _dot(a, w2.to(a.dtype), acc2, IEEE)
            blk2 += G * TS
        blk += G * TS
        a_ptrs += BLOCK_K
    if full * G < NB:  # the last, partial step
        g_ok = all_blocks & ((full * G + gg) < NB)[None, :]
        a = tl.load(a_ptrs, mask=a_row_ok[:, None] & ((full * BLOCK_K + kk) < K)[None, :], other=0.0)
        w = _weight_tile(blk, g_ok, Aux, FMT, BS, BLOCK_N, BLOCK_K)
        acc = _dot(a, w.to(a.dtype), acc, IEEE)
        if PAIR:
            w2 = _weight_tile(blk2, g_ok, Aux, FMT, BS, BLOCK_N, BLOCK_K)
            acc2 = _dot(a, w2.to(a.dtype), acc2, IEEE)
    return acc, acc2


@triton.jit
def store_rounded(acc, Y, Bias, Res, tm, rn, ok, N, STRIDE_YT, STRIDE_RT, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr):
    """Store an fp32 [rows, cols] tile with torch's unfused roundings: y = round(acc); y = round(y + bias);
    y = round(y + residual), in Y's dtype. Res may be Y itself (out += W x): each element is read, then
    written, by the one program that owns it."""
    y = acc.to(Y.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(Bias + rn, mask=rn < N, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(Y.dtype.element_ty)
    if HAS_RES:
        r = tl.load(Res + tm.to(tl.int64)[:, None] * STRIDE_RT + rn[None, :], mask=ok, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + tm.to(tl.int64)[:, None] * STRIDE_YT + rn[None, :], y, mask=ok)


@triton.jit
def _mmq_kernel(X, W, Y, Bias, Res, Aux, T, N, K, NB, ROW_BYTES, STRIDE_XT, STRIDE_YT, STRIDE_RT,
                FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, G: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, IEEE: tl.constexpr):
    # Grouped tile order: GROUP_M m-tiles share each n column, so W tiles are reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    tm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, G * BS)
    # Rows past T / N read row T - 1 / N - 1 (not stored): the full steps then need no load masks.
    a_ptrs = X + tl.minimum(tm, T - 1).to(tl.int64)[:, None] * STRIDE_XT + kk[None, :]
    w_rows = W + tl.minimum(rn, N - 1).to(tl.int64) * ROW_BYTES  # int64: an f32 output head is > 2^31 bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = mmq_tile(acc, acc, a_ptrs, tm >= 0, w_rows, w_rows, K, NB, Aux, FMT, BS, TS, BLOCK_N, G, IEEE, False)
    ok = (tm < T)[:, None] & (rn < N)[None, :]
    store_rounded(acc, Y, Bias, Res, tm, rn, ok, N, STRIDE_YT, STRIDE_RT, HAS_BIAS, HAS_RES)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MmqConfig:
    """Launch of the dequantizing GEMM: tile sizes (powers of two; BLOCK_K whole blocks), warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def default_config(block_size: int, t: int, n: int, on_gpu: bool, fp32: bool = False) -> MmqConfig:
    """The launch for ``t`` tokens, ``n`` weight rows and blocks of ``block_size`` values.

    GPU (reasoned, bench/gguf_gemm.py --sweep measures): BLOCK_M up to 128 tokens, so that each decoded
    weight value (7-13 instructions) feeds 128 tensor-core multiply-adds; BLOCK_K two 32-value blocks or one
    256-value super-block; BLOCK_N 128 (32-value blocks) or 64 (256-value ones: a [64, 256] decoded tile is
    already 64 fp32 registers a thread at 8 warps). The interpreter (a CPU) takes small tiles over few
    programs, which it runs fastest. ``fp32`` x (the IEEE dot, on the FMA units: operands in registers)
    takes small tiles on the GPU; at the bf16 tiles it spills (sm_90 compile)."""
    bs = max(block_size, 1)
    if not on_gpu:
        return MmqConfig(block_m=min(64, max(16, triton.next_power_of_2(t))), block_n=32,
                         block_k=max(32, bs), num_warps=4, num_stages=1)
    if fp32:
        return fp32_config(bs)
    block_m = min(128, max(16, triton.next_power_of_2(t)))
    block_k = max(64, bs)
    block_n = 64 if bs >= 256 else 128
    while block_n > 32 and triton.cdiv(n, block_n) * triton.cdiv(t, block_m) < 132:
        block_n //= 2  # a small problem still spreads over the SMs
    num_warps = 8 if block_m >= 64 or bs >= 256 else 4  # a decoded [BLOCK_N, 256] tile needs 8 warps' registers
    return MmqConfig(block_m, block_n, block_k, num_warps, num_stages=2 if bs >= 256 else 3)


def fp32_config(block_size: int) -> MmqConfig:
    """The GPU launch for fp32 x (the checking path, not the fast one): one 32-value block a step on 64 x 32
    output tiles (no spills on sm_90), or one 256-value super-block on 16 x 32. Triton's IEEE dot keeps a
    whole K step of both operands in registers, so a 256-wide step spills whatever the tile (sm_90 compile:
    ~3.6 KB at 16 x 32); accepted on this path, which is slow anyway."""
    if block_size >= 256:
        return MmqConfig(block_m=16, block_n=32, block_k=block_size, num_warps=4, num_stages=2)
    return MmqConfig(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2)


def smaller_config(config: MmqConfig) -> MmqConfig | None:
    """The next launch to try when ``config``'s tiles do not fit a GPU's shared memory per block: one stage
    fewer, then half the m-tile, then half the n-tile; None when nothing is left to shrink."""
    if config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    if config.block_m > 16:
        return replace(config, block_m=config.block_m // 2)
    if config.block_n > 16:
        return replace(config, block_n=config.block_n // 2)
    return None


# (kernel key, chosen config) -> the config that fitted: each failed try costs a compile, so it is made once.
_FITTED: dict[tuple[Hashable, MmqConfig], MmqConfig] = {}


def launch_fitted(key: Hashable, config: MmqConfig, launch: Callable[[MmqConfig], None]) -> None:
    """``launch(config)``, or where the GPU refuses it for its shared memory (Triton raises OutOfResources at
    the first launch, before anything is enqueued), the first of ``smaller_config``'s launches it takes.
    Why: the defaults are sized for Hopper's 227 KB a block; an Ampere (163 KB) or Ada (99 KB) GPU takes
    fewer stages or smaller tiles. The choice is remembered per ``key`` (kernel, format, dtype, device)."""
    chosen = _FITTED.get((key, config), config)
    while True:
        try:
            launch(chosen)
        except OutOfResources:
            chosen = smaller_config(chosen)
            if chosen is None:
                raise
            continue
        _FITTED[(key, config)] = chosen
        return


# ---------------------------------------------------------------------------------------------- launcher


def check_dot_dtype(x: torch.Tensor) -> None:
    """ValueError unless x is fp16, bf16 or fp32 (the dot dtypes)."""
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")


def check_config(config: MmqConfig, block_size: int) -> None:
    """ValueError unless the tiles are powers of two, >= 16 (tl.dot's minimum) and BLOCK_K whole blocks."""
    for name in ("block_m", "block_n", "block_k", "num_warps", "group_m"):
        check_power_of_two(f"config.{name}", getattr(config, name))
    check(min(config.block_m, config.block_n, config.block_k) >= 16,
          lambda: f"config tiles must be >= 16 (tl.dot), got {config}")
    check(config.block_k % max(block_size, 1) == 0,
          lambda: f"config.block_k {config.block_k} is not a whole number of {block_size}-value blocks")
    check(isinstance(config.num_stages, int) and config.num_stages >= 1,
          lambda: f"config.num_stages must be a positive int, got {config.num_stages!r}")


def mmq(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        config: MmqConfig | None = None) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32, unit column stride) @ dequant(weight).T (+ bias) (+ residual) -> [T, N]
    in x's dtype, one launch, any T (meant for T above the GEMV's few tokens).

    ``weight``: uint8 [N, row_bytes], rows of GGUF blocks of ``fmt`` (a name or gguf type id, any format in
    ``decode.DECODED``), contiguous and 16-byte aligned; K = row_bytes / type_size * block_size.
    ``out``, ``bias``, ``residual``: as ``mmvq`` (out may be a column slice of a wider buffer; residual may be
    out itself); rounding y = round(acc), y = round(y + bias), y = round(y + residual), each sum in fp32.
    ``config``: the launch (``default_config`` when None)."""
    f = decoded_format(fmt)
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    check_dot_dtype(x)
    t, k = x.shape
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * f.block_size == k, lambda: f"weight rows hold {nb * f.block_size} {f.name} values but x has K={k}")
    out, residual = epilogue_operands(x, t, n, out, bias, residual)
    config = default_config(f.block_size, t, n, x.is_cuda, x.dtype == torch.float32) if config is None else config
    check_config(config, f.block_size)
    if t == 0 or n == 0:
        return out
    x = x if (k <= 1 or x.stride(1) == 1) else x.contiguous()
    aux = lookup_table(f.name, x.device)

    def launch(c: MmqConfig) -> None:
        _mmq_kernel[(triton.cdiv(t, c.block_m) * triton.cdiv(n, c.block_n),)](
            x, weight, out, out if bias is None else bias, out if residual is None else residual, aux, t, n, k, nb,
            weight.shape[1], x.stride(0), out.stride(0), out.stride(0) if residual is None else residual.stride(0),
            FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            G=c.block_k // max(f.block_size, 1), GROUP_M=c.group_m, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, num_warps=c.num_warps,
            num_stages=c.num_stages)

    launch_fitted(("mmq", f.name, x.dtype, x.device), config, launch)
    return out
