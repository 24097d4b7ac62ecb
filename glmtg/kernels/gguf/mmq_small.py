"""y = x @ W.T for a decode batch (2..64 tokens), W a GGUF weight: each weight byte read and decoded once.

Why: at a few tokens a GEMM is bound by reading and decoding the weight, and the tile GEMM of prefill
(mmq.py) already decodes each weight tile once per m-tile: with one m-tile holding the whole batch every
byte is read once, and the products run on the tensor cores at no extra decode cost per token (unlike the
int8 GEMV, whose work grows with T). What mmq lacks for decode shapes is parallelism: a [T, 1024] output is
16 tiles of 64 columns on a GPU of 132 SMs. Here K is cut into ``split`` pieces: program (n-tile, m-tile,
piece) runs mmq's tile loop (``mmq.mmq_tile``, same decoders and dot) over its piece and stores fp32
partials [split, T, N]; a second kernel sums the pieces in order (deterministic, no atomics) and applies
mmq's epilogue. With split == 1 this is mmq itself, with ``small_batch.dense_config``'s tiles.

Numerics as mmq (weights rounded to x's dtype, products summed in fp32, y = round(acc); y = round(y + bias);
y = round(y + residual)); the split only reorders the fp32 sum (pieces summed in order after each piece's
own sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.gemv import check_weight, decoded_format
from glmtg.kernels.gguf.mmq import (
    MmqConfig,
    check_config,
    check_dot_dtype,
    fp32_config,
    launch_fitted,
    mmq,
    mmq_tile,
    store_rounded,
)
from glmtg.kernels.gguf.mmvq import epilogue_operands
from glmtg.kernels.gguf.small_batch import dense_config, sm_count, split_for
from glmtg.kernels.gguf.tables import lookup_table


@triton.jit
def _partial_kernel(X, W, P, Aux, T, N, NB, ROW_BYTES, STRIDE_XT, PIECE_BLOCKS, FMT: tl.constexpr,
                    BS: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    G: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    piece = tl.program_id(2)
    tm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    first = piece * PIECE_BLOCKS  # this piece's first block of each row
    nb = tl.minimum(NB - first, PIECE_BLOCKS)  # >= 1: the launcher makes no empty piece
    kk = tl.arange(0, G * BS)
    # Rows past T / N read row T - 1 / N - 1 (not stored): the full steps need no load masks (as mmq).
    a_ptrs = X + tl.minimum(tm, T - 1).to(tl.int64)[:, None] * STRIDE_XT + (first * BS + kk)[None, :]
    w_rows = W + tl.minimum(rn, N - 1).to(tl.int64) * ROW_BYTES + first.to(tl.int64) * TS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = mmq_tile(acc, acc, a_ptrs, tm >= 0, w_rows, w_rows, nb * BS, nb, Aux, FMT, BS, TS, BLOCK_N, G, IEEE,
                      False)
    ok = (tm < T)[:, None] & (rn < N)[None, :]
    at = (piece * T + tm).to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(P + at, acc, mask=ok)


@triton.jit
def _sum_kernel(P, Y, Bias, Res, T, N, SPLIT, STRIDE_YT, STRIDE_RT, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    tm = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (tm < T)[:, None] & (rn < N)[None, :]
    at = tm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    p = P + at
    for _ in range(SPLIT):  # pieces in order: one fixed sum, deterministic
        acc += tl.load(p, mask=ok, other=0.0)
        p += T * N
    store_rounded(acc, Y, Bias, Res, tm, rn, ok, N, STRIDE_YT, STRIDE_RT, HAS_BIAS, HAS_RES)  # mmq's epilogue


def mmq_small(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              config: MmqConfig | None = None, split: int | None = None) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32, unit column stride) @ dequant(weight).T (+ bias) (+ residual) -> [T, N]
    in x's dtype; ``mmq``'s contract (weight uint8 [N, row_bytes] of ``fmt`` blocks, contiguous, 16-byte
    aligned; ``out`` may be a column slice of a wider buffer; ``residual`` may be ``out``), for decode
    batches. ``config``: tiles (``small_batch.dense_config``, or mmq's fp32 tiles for fp32 x on a GPU, when
    None); ``split``: pieces of K (``small_batch.split_for`` when None; at most one piece per K step).
    Launches: one (split 1, mmq's kernel) or two (pieces, then their ordered sum with the epilogue);
    transient fp32 partials [split, T, N]. No host sync: capturable in a CUDA graph."""
    f = decoded_format(fmt)
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    check_dot_dtype(x)
    t, k = x.shape
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * f.block_size == k, lambda: f"weight rows hold {nb * f.block_size} {f.name} values but x has K={k}")
    if config is None:
        fp32_gpu = x.is_cuda and x.dtype == torch.float32
        config = fp32_config(f.block_size) if fp32_gpu else dense_config(f.block_size, t, x.is_cuda)
    check_config(config, f.block_size)
    g = config.block_k // max(f.block_size, 1)  # blocks a K step
    steps = triton.cdiv(nb, g)
    if split is None:
        split = split_for(config, t, n, k, sm_count(x.device))
    check(isinstance(split, int) and not isinstance(split, bool) and split >= 1,
          lambda: f"split must be a positive int, got {split!r}")
    # Whole K steps a piece, no empty piece: the piece count actually launched.
    piece_steps = triton.cdiv(steps, min(split, max(steps, 1)))
    pieces = triton.cdiv(steps, piece_steps) if steps else 1
    if pieces == 1 or t == 0 or n == 0:
        return mmq(x, weight, f.name, out=out, bias=bias, residual=residual, config=config)
    given_out = out is not None
    out, residual = epilogue_operands(x, t, n, out, bias, residual)
    x = x if x.stride(1) == 1 else x.contiguous()
    partial = torch.empty((pieces, t, n), dtype=torch.float32, device=x.device)
    aux = lookup_table(f.name, x.device)

    def launch(c: MmqConfig) -> None:
        _partial_kernel[(triton.cdiv(n, c.block_n), triton.cdiv(t, c.block_m), pieces)](
            x, weight, partial, aux, t, n, nb, weight.shape[1], x.stride(0), piece_steps * g,
            FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, BLOCK_M=c.block_m, BLOCK_N=c.block_n, G=g,
            IEEE=x.dtype == torch.float32, num_warps=c.num_warps, num_stages=c.num_stages)

    # smaller_config keeps BLOCK_K (and so the pieces' block offsets) and changes only tiles and stages.
    launch_fitted(("mmq_small", f.name, x.dtype, x.device), config, launch)
    block_t, block_n = 16, 128
    _sum_kernel[(triton.cdiv(n, block_n), triton.cdiv(t, block_t))](
        partial, out, out if bias is None else bias, out if residual is None else residual, t, n, pieces,
        out.stride(0), out.stride(0) if residual is None else residual.stride(0), BLOCK_T=block_t,
        BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if given_out and not out.is_inference():
        # written behind torch's back: bump its version so that a remembered int8 rounding of it
        # (activation.py's memo) no longer matches
        torch.autograd.graph.increment_version(out)
    return out
