"""y = x @ W.T for a decode batch, W in q4_0 or q8_0, by int8 tensor-core dots: llama.cpp's MMQ idea.

Why beside mmq_small (weights decoded to fp32, rounded to bf16, bf16 dots): there each weight value costs a
float decode (subtract, multiply, convert) before the dot, and that decode, not the bytes, may bound a
decode batch (the prefill GEMM measured ~1e12 decoded values/s, bench/results/gguf_gemm). Here a block's
codes go to the tensor cores as they are stored: q8_0's int8 bytes as loaded, q4_0's nibbles split by one
shift and mask; x is rounded to int8 per 32 values (activation.quantize_once: the norm's fused rounding is
reused where it was remembered) and each 32-value block is one int8 x int8 -> int32 dot [BLOCK_M, BLOCK_N],
exact, scaled after: acc += (dot - 8 · Σ x codes [q4_0's offset]) · dx[t] · d[n] in fp32.

Numerics as mmvq (the int8 GEMV): x rounded to int8 per 32 values (|error| <= dx / 2 a value), integer dot
products exact, the scaling and the sum over blocks in fp32, y = round(acc); y = round(y + bias);
y = round(y + residual). Layout and split as mmq_small (one m-tile for the whole batch, K cut into pieces
summed in order by mmq_small's epilogue kernel when the tiles alone leave the GPU idle). Unmeasured: chosen by
``GLMTG_SMALL_BATCH_DOT=int8`` (small_batch.DOT) for A/B against mmq_small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.gemv import check_weight, decoded_format
from glmtg.kernels.gguf.mmq import store_rounded
from glmtg.kernels.gguf.mmq_small import _sum_kernel
from glmtg.kernels.gguf.mmvq import epilogue_operands
from glmtg.kernels.gguf.small_batch import sm_count

I8_FORMATS = ("q4_0", "q8_0")


@triton.jit
def block_codes_dot(a, xs, w_rows, Q4: tl.constexpr):
    """One 32-value block of each weight row at byte pointers ``w_rows`` [BLOCK_N] (q4_0 with Q4, else q8_0)
    against int8 x codes ``a`` [BLOCK_M, 32] whose code sums are ``xs`` [BLOCK_M]: (the exact integer dot
    of x codes and weight values / d, int32 [BLOCK_M, BLOCK_N]; each row's scale d, fp32 [BLOCK_N])."""
    jj = tl.arange(0, 32)
    if Q4:
        # value j < 16: low nibble of byte j; j >= 16: high nibble of byte j - 16; codes 0..15, offset 8
        # taken off through the x code sums
        byte = tl.load(w_rows[:, None] + 2 + (jj % 16)[None, :])
        q = ((byte >> ((jj // 16) * 4).to(tl.uint8)[None, :]) & 15).to(tl.int8)
        s = tl.dot(a, tl.trans(q), out_dtype=tl.int32) - 8 * xs[:, None]
    else:
        q = tl.load((w_rows[:, None] + 2 + jj[None, :]).to(tl.pointer_type(tl.int8)))
        s = tl.dot(a, tl.trans(q), out_dtype=tl.int32)
    d = tl.load(w_rows.to(tl.pointer_type(tl.float16))).to(tl.float32)  # each block's leading fp16 scale
    return s, d


@triton.jit
def _i8_kernel(XQ, DX, XS, W, Y, P, Bias, Res, T, N, K, NB, ROW_BYTES, STRIDE_YT, STRIDE_RT, PIECE_BLOCKS,
               Q4: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    piece = tl.program_id(2)
    tm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jj = tl.arange(0, 32)
    first = piece * PIECE_BLOCKS
    nb = tl.minimum(NB - first, PIECE_BLOCKS)
    # Rows past T / N read row T - 1 / N - 1 (not stored): no load masks in the loop.
    tmc = tl.minimum(tm, T - 1).to(tl.int64)
    x_ptrs = XQ + tmc[:, None] * K + (first * 32 + jj)[None, :]
    s_ptrs = tmc * NB + first  # offsets of this piece's first block scale / code sum of each token
    w_rows = W + tl.minimum(rn, N - 1).to(tl.int64) * ROW_BYTES + first.to(tl.int64) * TS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(nb):
        a = tl.load(x_ptrs)  # int8 [BLOCK_M, 32]
        s, d = block_codes_dot(a, tl.load(XS + s_ptrs), w_rows, Q4)
        acc += s.to(tl.float32) * (tl.load(DX + s_ptrs)[:, None] * d[None, :])
        x_ptrs += 32
        s_ptrs += 1
        w_rows += TS
    ok = (tm < T)[:, None] & (rn < N)[None, :]
    if PARTIAL:
        tl.store(P + (piece * T + tm).to(tl.int64)[:, None] * N + rn[None, :], acc, mask=ok)
    else:
        store_rounded(acc, Y, Bias, Res, tm, rn, ok, N, STRIDE_YT, STRIDE_RT, HAS_BIAS, HAS_RES)


def i8_config(t: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): every token in one m-tile (16..64), 64 weight rows a program on a GPU
    (16 in the interpreter). Reasoned, not measured."""
    block_m = min(64, max(16, triton.next_power_of_2(t)))
    return block_m, (64 if on_gpu else 16), 4


def mmq_i8(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
           split: int | None = None) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32) @ dequant(weight).T (+ bias) (+ residual) -> [T, N] in x's dtype by
    int8 tensor-core dots; ``mmq_small``'s contract for weights in I8_FORMATS (q4_0, q8_0). ``quantized``:
    x's int8 blocks (activation.quantize_activation's (codes, dx, sums)) when already made, else
    ``activation.quantize_once(x)``. ``split``: pieces of K (None: as mmq_small chooses). Capturable."""
    from glmtg.kernels.gguf.activation import checked_quantized, quantize_once

    f = decoded_format(fmt)
    check(f.name in I8_FORMATS, lambda: f"fmt: mmq_i8 reads {I8_FORMATS}, got {f.name}")
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    t, k = x.shape
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * 32 == k, lambda: f"weight rows hold {nb * 32} {f.name} values but x has K={k}")
    given_out = out is not None
    out, residual = epilogue_operands(x, t, n, out, bias, residual)
    if t == 0 or n == 0:
        return out
    codes, dx, sums = quantize_once(x) if quantized is None else checked_quantized(quantized, t, k, x.device)
    block_m, block_n, warps = i8_config(t, x.is_cuda)
    tiles = triton.cdiv(t, block_m) * triton.cdiv(n, block_n)
    if split is None:
        sms = sm_count(x.device)
        split = 1 if tiles >= 2 * sms else max(1, min(triton.cdiv(2 * sms, tiles), nb // 16))
    check(isinstance(split, int) and not isinstance(split, bool) and split >= 1,
          lambda: f"split must be a positive int, got {split!r}")
    piece = triton.cdiv(nb, min(split, nb))
    pieces = triton.cdiv(nb, piece)
    partial = torch.empty((pieces, t, n), dtype=torch.float32, device=x.device) if pieces > 1 else out
    _i8_kernel[(triton.cdiv(n, block_n), triton.cdiv(t, block_m), pieces)](
        codes, dx, sums, weight, out, partial, out if bias is None else bias, out if residual is None else residual,
        t, n, k, nb, weight.shape[1], out.stride(0), out.stride(0) if residual is None else residual.stride(0),
        piece, Q4=f.name == "q4_0", TS=f.type_size, BLOCK_M=block_m, BLOCK_N=block_n, PARTIAL=pieces > 1,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, num_warps=warps, num_stages=3)
    if pieces > 1:
        _sum_kernel[(triton.cdiv(n, 128), triton.cdiv(t, 16))](
            partial, out, out if bias is None else bias, out if residual is None else residual, t, n, pieces,
            out.stride(0), out.stride(0) if residual is None else residual.stride(0), BLOCK_T=16, BLOCK_N=128,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if given_out and not out.is_inference():
        # written behind torch's back: bump its version so that a remembered int8 rounding of it
        # (activation.py's memo) no longer matches
        torch.autograd.graph.increment_version(out)
    return out
