"""Routed-expert SwiGLU for a few tokens (decode), expert weights read in their GGUF block formats in place.

y[t] = Σ_k weights[t, k] · down_e (silu(gate_e x[t]) · up_e x[t]),  e = ids[t, k].

The GGUF twin of glmtg/kernels/moe_decode.py (same structure, read it first): batch-1 decode is bound by
the bytes of the k chosen experts, so two kernels stream them once, decoding each block in registers
(``decode.decode_blocks``):

1. gate/up: one program per (token, slot) pair and block of BLOCK_I intermediate rows. It walks the hidden
   dimension G blocks at a time, accumulating decoded gate and up tiles times x elementwise in fp32 (one
   reduction at the end), and writes weight · silu(g) · u in fp32 to a tiny [T, k, I] buffer (the routing
   weight applied once per row here, not once per weight value in the down loop).
2. down: one program per token and block of BLOCK_H output rows. It loops over the k slots and the
   intermediate dimension, accumulating the decoded down tile times that buffer in fp32, and writes y once,
   rounded once to x's dtype. No atomics, so the result is deterministic.

gate and up share one format and down may have another (llama.cpp falls back to Q5_0 / Q8_0 / IQ4_NL for
down when I = 1408 is no multiple of 256). Default blocks: 8 rows x ~512 values a step, the bf16 kernel's
optimum; this kernel now serves only the formats mmvq_moe does not read (glmtg/kernels/gguf/dispatch.py).

Out-of-range expert ids are masked on the device: such a slot contributes exactly zero and reads no
weight byte. Nothing reads back to the host, so a decode step that calls this can be captured in a CUDA
graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.formats import BlockFormat
from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.decode import decode_blocks
from glmtg.kernels.gguf.gemv import (
    SUPPORTED_DTYPES,
    check_weight,
    decoded_format,
    steps_for,
)
from glmtg.kernels.gguf.tables import lookup_table


@triton.jit
def _gate_up_kernel(X, Gate, Up, Ids, Weights, Act, Aux, NB, INTER, NUM_EXPERTS, TOPK, ROW_BYTES, STRIDE_XT,
                    FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                    BLOCK_R: tl.constexpr, G: tl.constexpr):
    pair = tl.program_id(0)  # token * TOPK + slot
    t = pair // TOPK
    expert = tl.load(Ids + pair)
    valid = (expert >= 0) & (expert < NUM_EXPERTS)
    # int64: E * I * row_bytes passes 2^31 bytes on the full-size models.
    base = tl.where(valid, expert, 0).to(tl.int64) * INTER * ROW_BYTES
    offs_i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Rows past INTER read row INTER - 1 (not stored), so that the full steps' loads need no mask (as
    # gemv.py); an invalid slot runs no step at all, so it reads no weight byte.
    rows = tl.minimum(offs_i, INTER - 1)
    gg = tl.arange(0, G)
    jj = tl.arange(0, BS)
    rel = base + rows.to(tl.int64)[:, None] * ROW_BYTES + (gg * TS)[None, :]  # [BLOCK_R, G]
    blk_g = Gate + rel
    blk_u = Up + rel
    # x in the weight tile's [BLOCK_R, G, BS] shape (as gemv.py): loaded in the tile's layout.
    x_ptrs = X + t.to(tl.int64) * STRIDE_XT + (rows * 0)[:, None, None] + (gg * BS)[None, :, None] + jj[None, None, :]
    all_blocks = tl.full((BLOCK_R, G), True, tl.int1)
    acc_g = tl.zeros((BLOCK_R, G, BS), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_R, G, BS), dtype=tl.float32)
    full = NB // G
    for _ in range(tl.where(valid, full, 0)):
        xv = tl.load(x_ptrs).to(tl.float32)
        acc_g += decode_blocks(blk_g, all_blocks, Aux, FMT, BS) * xv
        acc_u += decode_blocks(blk_u, all_blocks, Aux, FMT, BS) * xv
        blk_g += G * TS
        blk_u += G * TS
        x_ptrs += G * BS
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + gg) < NB
        m = all_blocks & g_ok[None, :] & valid
        xv = tl.load(x_ptrs, mask=g_ok[None, :, None], other=0.0).to(tl.float32)
        acc_g += decode_blocks(blk_g, m, Aux, FMT, BS) * xv
        acc_u += decode_blocks(blk_u, m, Aux, FMT, BS) * xv
    g = tl.sum(tl.sum(acc_g, axis=2), axis=1)
    u = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    # The routing weight is folded into h here, once per row: Σ_k w Σ_i D h_i = Σ_k Σ_i D (w h_i) (fp32).
    w = tl.where(valid, tl.load(Weights + pair), 0.0)
    h = g * tl.sigmoid(g) * u * w  # an invalid slot gives silu(0) * 0 * 0 = 0
    tl.store(Act + pair.to(tl.int64) * INTER + offs_i, h, mask=offs_i < INTER)


@triton.jit
def _down_kernel(Act, Down, Ids, Y, Aux, NB, HIDDEN, INTER, NUM_EXPERTS, TOPK, ROW_BYTES, STRIDE_YT,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                 BLOCK_R: tl.constexpr, G: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(offs_h, HIDDEN - 1)  # as in _gate_up_kernel: full steps load without a mask
    gg = tl.arange(0, G)
    jj = tl.arange(0, BS)
    rel = rows.to(tl.int64)[:, None] * ROW_BYTES + (gg * TS)[None, :]  # [BLOCK_R, G] within an expert
    a_offs = (rows * 0)[:, None, None] + (gg * BS)[None, :, None] + jj[None, None, :]
    all_blocks = tl.full((BLOCK_R, G), True, tl.int1)
    acc = tl.zeros((BLOCK_R, G, BS), dtype=tl.float32)
    full = NB // G
    for slot in range(TOPK):
        pair = t * TOPK + slot
        expert = tl.load(Ids + pair)
        valid = (expert >= 0) & (expert < NUM_EXPERTS)
        blk = Down + tl.where(valid, expert, 0).to(tl.int64) * HIDDEN * ROW_BYTES + rel
        a_ptrs = Act + pair.to(tl.int64) * INTER + a_offs
        # An invalid slot runs no step: it reads no weight byte and adds nothing.
        for _ in range(tl.where(valid, full, 0)):
            acc += decode_blocks(blk, all_blocks, Aux, FMT, BS) * tl.load(a_ptrs)  # act holds w * h
            blk += G * TS
            a_ptrs += G * BS
        if full * G < NB:  # the last, partial step
            g_ok = (full * G + gg) < NB
            a = tl.load(a_ptrs, mask=g_ok[None, :, None], other=0.0)
            acc += decode_blocks(blk, all_blocks & g_ok[None, :] & valid, Aux, FMT, BS) * a
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(Y + t.to(tl.int64) * STRIDE_YT + offs_h, y.to(Y.dtype.element_ty), mask=offs_h < HIDDEN)



def check_moe_args(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor, fgu: BlockFormat, fd: BlockFormat, out: torch.Tensor | None
                   ) -> tuple[int, int, int, int, int, int, int, torch.Tensor]:
    """The routed-expert decode launchers' argument checks (this module's and mmvq_moe's): ValueError naming
    the argument. Returns (T, H, blocks per gate row, blocks per down row, E, I, k, out), ``out`` allocated
    when None."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, H], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, hidden = x.shape
    nb_h = check_weight("gate", gate, fgu, 3, x.device)
    check_weight("up", up, fgu, 3, x.device)
    nb_i = check_weight("down", down, fd, 3, x.device)
    num_experts, inter = gate.shape[0], gate.shape[1]
    check(nb_h * fgu.block_size == hidden,
          lambda: f"gate rows hold {nb_h * fgu.block_size} {fgu.name} values but x has H={hidden}")
    check(up.shape == gate.shape, lambda: f"up shape {tuple(up.shape)} must equal gate shape {tuple(gate.shape)}")
    check(down.shape[0] == num_experts and down.shape[1] == hidden and nb_i * fd.block_size == inter,
          lambda: f"down must be [E={num_experts}, H={hidden}, {fd.name} rows of I={inter} values], got "
                  f"{tuple(down.shape)} ({nb_i * fd.block_size} values a row)")
    check(num_experts >= 1 and inter >= 1, lambda: f"empty expert weights {tuple(gate.shape)}")
    check(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == t,
          lambda: f"ids must be a 2-D tensor [T={t}, k], got {describe(ids)}")
    check(ids.dtype == torch.int64, lambda: f"ids dtype must be torch.int64, got {ids.dtype}")
    check(ids.device == x.device, lambda: f"ids is on {ids.device} but x is on {x.device}")
    top_k = ids.shape[1]
    check(top_k >= 1, "ids must have k >= 1 slots")
    check(isinstance(weights, torch.Tensor) and weights.shape == ids.shape,
          lambda: f"weights must have ids' shape {tuple(ids.shape)}, got {describe(weights)}")
    check(weights.dtype == torch.float32, lambda: f"weights dtype must be torch.float32, got {weights.dtype}")
    check(weights.device == x.device, lambda: f"weights is on {weights.device} but x is on {x.device}")
    if out is None:
        out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    else:
        check(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
              and out.device == x.device and out.is_contiguous(),
              lambda: f"out must be a contiguous {x.dtype} tensor {tuple(x.shape)} on {x.device}, got {describe(out)}")
    return t, hidden, nb_h, nb_i, num_experts, inter, top_k, out


def quant_moe_decode(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_fmt: str | int,
    down_fmt: str | int,
    *,
    out: torch.Tensor | None = None,
    block_i: int = 8,
    values_per_step: int = 512,
    block_h: int = 8,
    values_per_step_down: int = 512,
    num_warps: int = 4,
) -> torch.Tensor:
    """Σ_k weights[t, k] · down_e(silu(gate_e x[t]) · up_e x[t]) with e = ids[t, k], as [T, H] in x's dtype.

    x [T, H] (fp16, bf16 or fp32); gate, up uint8 [E, I, rbH] (rows of GGUF blocks of ``gate_up_fmt``,
    H values each); down uint8 [E, H, rbI] (rows of ``down_fmt`` blocks, I values each); contiguous and
    16-byte aligned. ids int64 [T, k]; weights fp32 [T, k]. Accumulation and the weighted sum are fp32,
    rounded once. An id outside [0, E) contributes zero and reads no weight. Launch knobs: gate/up programs
    cover ``block_i`` intermediate rows and step ~``values_per_step`` values of H; down programs cover
    ``block_h`` output rows and step ~``values_per_step_down`` values of I (rounded to a power of two of
    whole blocks).
    """
    fgu = decoded_format(gate_up_fmt, "gate_up_fmt")
    fd = decoded_format(down_fmt, "down_fmt")
    t, hidden, nb_h, nb_i, num_experts, inter, top_k, out = check_moe_args(x, gate, up, down, ids, weights,
                                                                          fgu, fd, out)
    for name, value in (("block_i", block_i), ("values_per_step", values_per_step), ("block_h", block_h),
                        ("values_per_step_down", values_per_step_down), ("num_warps", num_warps)):
        check_power_of_two(name, value)
    if t == 0:
        return out

    # x, ids and weights are a few KB: copying them if strided costs nothing (and nothing host-side).
    x = x if x.stride(1) == 1 else x.contiguous()
    ids, weights = ids.contiguous(), weights.contiguous()
    act = torch.empty((t, top_k, inter), dtype=torch.float32, device=x.device)
    _gate_up_kernel[(t * top_k, triton.cdiv(inter, block_i))](
        x, gate, up, ids, weights, act, lookup_table(fgu.name, x.device), nb_h, inter, num_experts, top_k,
        gate.shape[2], x.stride(0),
        FMT=fgu.gguf_type, BS=fgu.block_size, TS=fgu.type_size, BLOCK_R=block_i,
        G=steps_for(fgu.block_size, values_per_step), num_warps=num_warps,
    )
    _down_kernel[(t, triton.cdiv(hidden, block_h))](
        act, down, ids, out, lookup_table(fd.name, x.device), nb_i, hidden, inter, num_experts, top_k,
        down.shape[2], out.stride(0),
        FMT=fd.gguf_type, BS=fd.block_size, TS=fd.type_size, BLOCK_R=block_h,
        G=steps_for(fd.block_size, values_per_step_down), num_warps=num_warps,
    )
    return out
