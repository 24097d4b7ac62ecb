"""The GLM4-MoE sigmoid router of a decode step in two Triton launches (torch runs it as ~10 kernels).

ids, weights = top-k experts of sigmoid(x W^T) + bias, weighted by the unbiased scores (DeepSeek-V3 style),
the same as glmtg.layers.moe.Router for n_group == 1 (every GLM-4.5 model; grouped selection stays in torch):

1. logits: W (fp32 [E, H], 2 MB for Air) is read once, spread over many programs so the read runs near
   memory speed: a program takes ``block_e`` expert rows and one of ``split`` slices of H, walks it in
   chunks and multiplies by every token of its block (up to 16 tokens, all of a decode step, so no row is
   read twice), converting x to fp32 as it loads. Each program writes fp32 partial sums [split, T, E]; no
   atomics, so the result is deterministic.
2. select: one program per token sums the partials, takes sigmoid, adds the bias and picks the top k by
   repeated argmax (a tie goes to the lower expert index), so the ids come out ordered by descending
   choice as torch.topk orders them. It gathers the unbiased scores, normalizes them (w / (Σw + 1e-20))
   when asked and multiplies by ``scaling`` last, the order Router uses.

Default blocks (Air, E = 128, H = 4096): 4 rows x 4 slices = 128 programs of 16 KB of W each, about one
per SM of an H100/H200. Nothing is read back to the host, so a CUDA graph can capture a call.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Kernel 2 holds a token's E choices in one register vector; 256 (DeepSeek-V3) is the largest E in use.
MAX_EXPERTS = 256
# Tokens a logits program multiplies each W tile by: a decode step has at most 16, so W is read once.
MAX_BLOCK_T = 16


@triton.jit
def _logits_kernel(X, W, Part, T, HIDDEN, E, SPAN,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    wait_and_release(PDL)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(1)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_e = offs_e < E
    mask_t = offs_t < T
    h_start = split * SPAN
    h_stop = tl.minimum(h_start + SPAN, HIDDEN)
    w_rows = W + offs_e[:, None].to(tl.int64) * HIDDEN
    x_rows = X + offs_t[:, None].to(tl.int64) * HIDDEN
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(h_start, h_stop, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < h_stop
        w = tl.load(w_rows + offs_h[None, :], mask=mask_e[:, None] & mask_h[None, :], other=0.0)
        x = tl.load(x_rows + offs_h[None, :], mask=mask_t[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        # [T, 1, H] * [1, E, H] summed over H: each W tile multiplies every token of the block.
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    # A slice past H (small H, many splits) still writes its zeros: kernel 2 sums every slice.
    part = Part + (split * T + offs_t[:, None]).to(tl.int64) * E + offs_e[None, :]
    tl.store(part, acc, mask=mask_t[:, None] & mask_e[None, :])


@triton.jit
def _select_kernel(Part, Bias, Ids, Weights, T, E, TOPK, scaling,
                   SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                   PDL: tl.constexpr = False):
    t = tl.program_id(0)
    wait_and_release(PDL)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_s = tl.arange(0, SPLIT)
    part = tl.load(Part + (offs_s[:, None] * T + t).to(tl.int64) * E + offs_e[None, :],
                   mask=mask_e[None, :], other=0.0)
    scores = tl.sigmoid(tl.sum(part, axis=0))
    bias = tl.load(Bias + offs_e, mask=mask_e, other=0.0)
    # Padding lanes can never win: a real choice is a score in [0, 1] plus a finite bias.
    choice = tl.where(mask_e, scores + bias, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in range(TOPK):
        # First index of the maximum; clamped so that a NaN input can never yield an id outside [0, E).
        best = tl.minimum(tl.argmax(choice, axis=0, tie_break_left=True), E - 1)
        hit = offs_e == best
        slot = offs_k == j
        ids = tl.where(slot, best.to(tl.int64), ids)
        w = tl.where(slot, tl.sum(tl.where(hit, scores, 0.0), axis=0), w)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)  # padding slots hold 0 and add nothing
    w = w * scaling
    mask_k = offs_k < TOPK
    row = t.to(tl.int64) * TOPK
    tl.store(Ids + row + offs_k, ids, mask=mask_k)
    tl.store(Weights + row + offs_k, w, mask=mask_k)


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
    block_e: int = 4,
    block_h: int = 1024,
    split: int = 4,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k routing of x [T, H]: (expert ids int64 [T, k], fp32 weights [T, k]).

    scores = sigmoid(fp32(x) @ weight^T) with fp32 accumulation; ids = the k largest scores + bias, ordered
    by descending choice (ties: lower index first); weights = the scores at ids, divided by (their sum +
    1e-20) if ``norm_topk_prob``, then times ``scaling``. x fp16/bf16/fp32; weight fp32 [E, H] contiguous;
    bias fp32 [E]; 1 <= top_k <= E <= 256. Blocks: a logits program takes ``block_e`` rows of weight and
    one of ``split`` slices of H, walked in chunks of ``block_h`` / (tokens per program) columns, at least
    128 * ``num_warps`` / ``block_e`` (all powers of two).
    """
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, H], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, hidden = x.shape
    check(hidden >= 1, "x must have H >= 1 columns")
    check(isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden,
          lambda: f"weight must be a 2-D tensor [E, H={hidden}], got {describe(weight)}")
    check(weight.dtype == torch.float32, lambda: f"weight dtype must be torch.float32, got {weight.dtype}")
    check(weight.device == x.device, lambda: f"weight is on {weight.device} but x is on {x.device}")
    # A copy of W per call would cost more than the kernel, so no silent .contiguous() here.
    check(weight.is_contiguous(), lambda: f"weight must be contiguous, strides {weight.stride()}")
    experts = weight.shape[0]
    check(1 <= experts <= MAX_EXPERTS, lambda: f"weight must have 1..{MAX_EXPERTS} experts (rows), got {experts}")
    check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (experts,),
          lambda: f"bias must be a 1-D tensor [E={experts}], got {describe(bias)}")
    check(bias.dtype == torch.float32, lambda: f"bias dtype must be torch.float32, got {bias.dtype}")
    check(bias.device == x.device, lambda: f"bias is on {bias.device} but x is on {x.device}")
    check(isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= experts,
          lambda: f"top_k must be an int in [1, {experts}], got {top_k!r}")
    check(isinstance(norm_topk_prob, bool), lambda: f"norm_topk_prob must be a bool, got {norm_topk_prob!r}")
    check(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling)
          and scaling > 0, lambda: f"scaling must be a finite number > 0, got {scaling!r}")
    for name, value in (("block_e", block_e), ("block_h", block_h), ("split", split), ("num_warps", num_warps)):
        check_power_of_two(name, value)

    ids = torch.empty((t, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=x.device)
    if t == 0:
        return ids, weights
    x, bias = x.contiguous(), bias.contiguous()  # a few KB: copying a strided one costs nothing
    block_t = min(triton.next_power_of_2(t), MAX_BLOCK_T)
    # Chunk of H per step: the product [block_t, block_e, chunk] held at block_e * block_h elements
    # (registers), but the W tile [block_e, chunk] no smaller than one 16-byte load (4 fp32) per thread.
    chunk = max(block_h // block_t, 4 * 32 * num_warps // block_e, 16)
    span = triton.cdiv(triton.cdiv(hidden, split), chunk) * chunk  # slices start on a chunk boundary
    part = torch.empty((split, t, experts), dtype=torch.float32, device=x.device)
    pdl, launch = enabled(x.device), launch_kwargs(x.device)
    _logits_kernel[(triton.cdiv(experts, block_e), split, triton.cdiv(t, block_t))](
        x, weight, part, t, hidden, experts, span,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=chunk, PDL=pdl, num_warps=num_warps, **launch,
    )
    _select_kernel[(t,)](
        part, bias, ids, weights, t, experts, top_k, float(scaling),
        SPLIT=split, BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=triton.next_power_of_2(top_k),
        NORM=norm_topk_prob, PDL=pdl, num_warps=num_warps, **launch,
    )
    return ids, weights
