"""Routed-expert SwiGLU for a few tokens (decode), reading each chosen expert's weights in place.

y[t] = Σ_k weights[t, k] · down_e (silu(gate_e x[t]) · up_e x[t]),  e = ids[t, k].

Batch-1 decode is bound by the bytes of the k chosen experts: copying them out first (``W[ids]``) reads
them, writes a copy and reads the copy again. Here two kernels stream them once:

1. gate/up: one program per (token, slot) pair and block of BLOCK_I intermediate rows. It walks the
   hidden dimension in BLOCK_K chunks, multiplying the gate and up tiles by x elementwise into fp32
   accumulators (one reduction at the end, none in the loop), and writes h = silu(g) · u in fp32 to a
   tiny [T, k, I] buffer.
2. down: one program per token and block of BLOCK_H output rows. It loops over the k slots and the
   intermediate dimension, accumulating weight · down_e tile · h in fp32, and writes y once, rounded
   once to x's dtype. No atomics, so the result is deterministic.

Default blocks: the compiler does not software-pipeline these loads (they feed no tl.dot), so the bytes
in flight come from many resident programs. gate/up 8 x 512 and down 8 x 512 were the fastest of the
configurations timed on the H100 (bench/results/moe_decode_blocks_sweep.json: Air, T=1 99.8 us,
2.77 TB/s; T=4 356 us); bench/moe_decode.py --sweep reruns that comparison.

Out-of-range expert ids are masked on the device: such a slot contributes exactly zero and no memory
outside the weights is read. Nothing reads back to the host, so a decode step that calls this can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, check_power_of_two, describe

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gate_up_kernel(X, Gate, Up, Ids, Act, HIDDEN, INTER, NUM_EXPERTS, TOPK,
                    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)  # token * TOPK + slot
    t = pair // TOPK
    expert = tl.load(Ids + pair)
    valid = (expert >= 0) & (expert < NUM_EXPERTS)
    # Expert base in int64: NUM_EXPERTS * INTER * HIDDEN elements can pass 2^31 on the full-size models.
    base = tl.where(valid, expert, 0).to(tl.int64) * INTER * HIDDEN
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = (offs_i < INTER) & valid
    rows = offs_i[:, None] * HIDDEN  # within one expert: INTER * HIDDEN < 2^31
    x_row = X + t.to(tl.int64) * HIDDEN
    acc_g = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < HIDDEN
        xk = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        m = mask_i[:, None] & mask_k[None, :]
        g = tl.load(Gate + base + rows + offs_k[None, :], mask=m, other=0.0)
        u = tl.load(Up + base + rows + offs_k[None, :], mask=m, other=0.0)
        acc_g += g.to(tl.float32) * xk
        acc_u += u.to(tl.float32) * xk
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    h = g * tl.sigmoid(g) * u  # an invalid slot gives silu(0) * 0 = 0
    tl.store(Act + pair.to(tl.int64) * INTER + offs_i, h, mask=offs_i < INTER)


@triton.jit
def _down_kernel(Act, Down, Ids, Weights, Y, HIDDEN, INTER, NUM_EXPERTS, TOPK,
                 BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    rows = offs_h[:, None] * INTER
    acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
    for slot in range(TOPK):
        pair = t * TOPK + slot
        expert = tl.load(Ids + pair)
        valid = (expert >= 0) & (expert < NUM_EXPERTS)
        base = tl.where(valid, expert, 0).to(tl.int64) * HIDDEN * INTER
        w = tl.where(valid, tl.load(Weights + pair), 0.0)
        act_row = Act + pair.to(tl.int64) * INTER
        mask_row = mask_h[:, None] & valid
        for k0 in range(0, INTER, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < INTER
            # The routing weight is folded into h: Σ_k w Σ_i D h_i = Σ_k Σ_i D (w h_i), all in fp32.
            a = tl.load(act_row + offs_k, mask=mask_k, other=0.0) * w
            d = tl.load(Down + base + rows + offs_k[None, :], mask=mask_row & mask_k[None, :], other=0.0)
            acc += d.to(tl.float32) * a[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(Y + t.to(tl.int64) * HIDDEN + offs_h, y.to(Y.dtype.element_ty), mask=mask_h)



def moe_decode(
    x: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_i: int = 8,
    block_k: int = 512,
    block_h: int = 8,
    block_k_down: int = 512,
    num_warps: int = 4,
) -> torch.Tensor:
    """Σ_k weights[t, k] · down_e(silu(gate_e x[t]) · up_e x[t]) with e = ids[t, k], as [T, H] in x's dtype.

    x [T, H]; gate_proj, up_proj [E, I, H] and down_proj [E, H, I], contiguous, x's dtype (fp16, bf16 or
    fp32); ids int64 [T, k]; weights fp32 [T, k]. Accumulation and the weighted sum are fp32, rounded once.
    An id outside [0, E) contributes zero. Block sizes: gate/up programs cover ``block_i`` intermediate
    rows and step over H by ``block_k``; down programs cover ``block_h`` output rows and step over I by
    ``block_k_down``.
    """
    check(isinstance(x, torch.Tensor) and x.dim() == 2, f"x must be a 2-D tensor [T, H], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, hidden = x.shape
    for name, w in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
        check(isinstance(w, torch.Tensor) and w.dim() == 3, f"{name} must be a 3-D tensor, got {describe(w)}")
        check(w.dtype == x.dtype, f"{name} dtype {w.dtype} must equal x dtype {x.dtype}")
        check(w.device == x.device, f"{name} is on {w.device} but x is on {x.device}")
        # A copy of the weights is what this kernel exists to avoid, so no silent .contiguous() here.
        check(w.is_contiguous(), f"{name} must be contiguous, strides {w.stride()}")
    num_experts, inter = gate_proj.shape[0], gate_proj.shape[1]
    check(gate_proj.shape[2] == hidden, f"gate_proj must be [E, I, H={hidden}], got {tuple(gate_proj.shape)}")
    check(up_proj.shape == gate_proj.shape, f"up_proj shape {tuple(up_proj.shape)} must equal gate_proj shape "
          f"{tuple(gate_proj.shape)}")
    check(tuple(down_proj.shape) == (num_experts, hidden, inter),
          f"down_proj must be [E={num_experts}, H={hidden}, I={inter}], got {tuple(down_proj.shape)}")
    check(num_experts >= 1 and inter >= 1 and hidden >= 1, f"empty expert weights {tuple(gate_proj.shape)}")
    check(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == t,
          f"ids must be a 2-D tensor [T={t}, k], got {describe(ids)}")
    check(ids.dtype == torch.int64, f"ids dtype must be torch.int64, got {ids.dtype}")
    check(ids.device == x.device, f"ids is on {ids.device} but x is on {x.device}")
    top_k = ids.shape[1]
    check(top_k >= 1, "ids must have k >= 1 slots")
    check(isinstance(weights, torch.Tensor) and weights.shape == ids.shape,
          f"weights must have ids' shape {tuple(ids.shape)}, got {describe(weights)}")
    check(weights.dtype == torch.float32, f"weights dtype must be torch.float32, got {weights.dtype}")
    check(weights.device == x.device, f"weights is on {weights.device} but x is on {x.device}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        check(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
              and out.device == x.device and out.is_contiguous(),
              f"out must be a contiguous {x.dtype} tensor {tuple(x.shape)} on {x.device}, got {describe(out)}")
    for name, value in (("block_i", block_i), ("block_k", block_k), ("block_h", block_h),
                        ("block_k_down", block_k_down), ("num_warps", num_warps)):
        check_power_of_two(name, value)
    if t == 0:
        return out

    # x, ids and weights are a few KB: copying them if strided costs nothing (and nothing host-side).
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    act = torch.empty((t, top_k, inter), dtype=torch.float32, device=x.device)
    _gate_up_kernel[(t * top_k, triton.cdiv(inter, block_i))](
        x, gate_proj, up_proj, ids, act, hidden, inter, num_experts, top_k,
        BLOCK_I=block_i, BLOCK_K=block_k, num_warps=num_warps,
    )
    _down_kernel[(t, triton.cdiv(hidden, block_h))](
        act, down_proj, ids, weights, out, hidden, inter, num_experts, top_k,
        BLOCK_H=block_h, BLOCK_K=block_k_down, num_warps=num_warps,
    )
    return out
