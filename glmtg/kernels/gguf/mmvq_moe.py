"""Routed-expert SwiGLU for a few tokens by int8 dot products (the MMVQ path), expert weights in GGUF blocks.

y[t] = Σ_k weights[t, k] · down_e (silu(gate_e x[t]) · up_e x[t]),  e = ids[t, k].

The structure of moe.py (read it first), with the weight blocks consumed by words.block_dot instead of
being decoded to fp32:

1. x is quantized to int8 per 32 values (mmvq.quantize_activation);
2. gate/up: one program per (token, slot) pair and BLOCK_I intermediate rows; writes weight · silu(g) · u
   in fp32 to a [T, k, I] buffer (the routing weight folded in once per row);
3. that buffer is quantized to int8 per 32 values (the same small kernel);
4. down: one program per token and BLOCK_H output rows, looping over the k slots; y written once, no
   atomics (deterministic).

An expert id outside [0, E) is masked on the device: its slot runs no step, reads no weight byte and
contributes exactly zero (its buffer row is 0, so its codes and scales are 0). Nothing is read back to the
host: CUDA-graph capturable. Numerics: as mmvq, x and the intermediate are each rounded to int8 per 32.

Up to four launches where moe.py has two: the two quantizations are tiny (a few KB) but each is a
dependent launch. With block_i a multiple of 32 the gate/up programs hold whole activation groups and
quantize the intermediate in their epilogue (step 3 goes away); the default launches (one row a program on
CUDA, measured fastest: bench/DECISIONS.md H2; ``step_config`` elsewhere) keep step 3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.activation import quantize_once
from glmtg.kernels.gguf.gemv import steps_for
from glmtg.kernels.gguf.mmvq import (
    GROUP,
    mmvq_format,
    quantize_activation,
    quantize_groups,
)
from glmtg.kernels.gguf import mmvq_moe_lanes
from glmtg.kernels.gguf.moe import check_moe_args
from glmtg.kernels.gguf.words import block_dot
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release


@triton.jit
def _gate_up_kernel(XW, DX, XS, Gate, Up, Ids, Weights, Act, AQ, ADX, AS, NB, NG, INTER, NUM_EXPERTS, TOPK,
                    ROW_BYTES, FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_R: tl.constexpr,
                    G: tl.constexpr, FUSED: tl.constexpr, PDL: tl.constexpr = False, SGate=None, SUp=None,
                    SHARED: tl.constexpr = 0):
    GPB: tl.constexpr = BS // 32
    B: tl.constexpr = BLOCK_R * G
    pair = tl.program_id(0)  # token * (TOPK + SHARED) + slot; slot TOPK (if SHARED) is the shared expert
    t = pair // (TOPK + SHARED)
    slot = pair % (TOPK + SHARED)
    routed = slot < TOPK
    wait_and_release(PDL)  # the ids come from the router, just before
    expert = tl.load(Ids + t * TOPK + slot, mask=routed, other=0)
    valid = (expert >= 0) & (expert < NUM_EXPERTS)
    base = tl.where(valid, expert, 0).to(tl.int64) * INTER * ROW_BYTES  # int64: E·I·row_bytes > 2^31
    gate_rows, up_rows = Gate + base, Up + base
    if SHARED:
        if not routed:  # the shared expert: its own [I, row_bytes] matrices, weight 1
            gate_rows, up_rows = SGate + base * 0, SUp + base * 0
    # one flat axis over BLOCK_R rows x G blocks (as mmvq._mmvq_kernel)
    idx = tl.arange(0, B)
    g = idx % G
    # rows past INTER read row INTER - 1 (not stored): the full steps' loads need no mask
    rows = tl.minimum(tl.program_id(1) * BLOCK_R + idx // G, INTER - 1)
    rel = rows.to(tl.int64) * ROW_BYTES + g * TS
    blk_g = gate_rows + rel
    blk_u = up_rows + rel
    grp = (t.to(tl.int64) * NG + g * GPB)[None, :]  # [1, B]
    x_all = grp >= 0
    all_blocks = idx >= 0
    acc_g = tl.zeros((1, B), dtype=tl.float32)
    acc_u = tl.zeros((1, B), dtype=tl.float32)
    full = NB // G
    for _ in range(tl.where(valid, full, 0)):  # an invalid slot runs no step: reads no weight byte
        acc_g += block_dot(blk_g, all_blocks, XW + grp * 8, DX + grp, XS + grp, x_all, FMT)
        acc_u += block_dot(blk_u, all_blocks, XW + grp * 8, DX + grp, XS + grp, x_all, FMT)
        blk_g += G * TS
        blk_u += G * TS
        grp += G * GPB
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + g) < NB
        m = g_ok & valid
        xm = x_all & g_ok[None, :]
        acc_g += block_dot(blk_g, m, XW + grp * 8, DX + grp, XS + grp, xm, FMT)
        acc_u += block_dot(blk_u, m, XW + grp * 8, DX + grp, XS + grp, xm, FMT)
    gv = tl.sum(tl.reshape(acc_g, [BLOCK_R, G]), axis=1)
    uv = tl.sum(tl.reshape(acc_u, [BLOCK_R, G]), axis=1)
    w = tl.where(valid, tl.load(Weights + t * TOPK + slot, mask=routed, other=1.0), 0.0)
    h = gv * tl.sigmoid(gv) * uv * w  # an invalid slot: silu(0) · 0 · 0 = 0
    offs_i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if FUSED:
        # BLOCK_R a multiple of 32 (and INTER too): the program holds whole activation groups and quantizes
        # them here (mmvq.quantize_groups); a group is wholly in range or wholly past INTER (not stored).
        q, dx, sums = quantize_groups(tl.reshape(h, [BLOCK_R // 32, 32]))
        grp = tl.program_id(1) * (BLOCK_R // 32) + tl.arange(0, BLOCK_R // 32)
        ok = grp < INTER // 32
        tl.store(AQ + pair.to(tl.int64) * INTER + tl.reshape(offs_i, [BLOCK_R // 32, 32]), q.to(tl.int8),
                 mask=ok[:, None])
        tl.store(ADX + pair.to(tl.int64) * (INTER // 32) + grp, dx, mask=ok)
        tl.store(AS + pair.to(tl.int64) * (INTER // 32) + grp, sums, mask=ok)
    else:
        tl.store(Act + pair.to(tl.int64) * INTER + offs_i, h, mask=offs_i < INTER)


@triton.jit
def _down_kernel(AW, ADX, AS, Down, Ids, Y, NB, NG, HIDDEN, NUM_EXPERTS, TOPK, ROW_BYTES, STRIDE_YT,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr,
                 PDL: tl.constexpr = False, SDown=None, SHARED: tl.constexpr = 0):
    GPB: tl.constexpr = BS // 32
    B: tl.constexpr = BLOCK_R * G
    t = tl.program_id(0)
    wait_and_release(PDL)  # the ids and the intermediate come from the kernels before
    idx = tl.arange(0, B)
    g = idx % G
    rows = tl.minimum(tl.program_id(1) * BLOCK_R + idx // G, HIDDEN - 1)
    rel = rows.to(tl.int64) * ROW_BYTES + g * TS
    grp0 = (g * GPB)[None, :]
    x_all = grp0 >= 0
    all_blocks = idx >= 0
    acc = tl.zeros((1, B), dtype=tl.float32)
    full = NB // G
    for slot in range(TOPK + SHARED):
        pair = t * (TOPK + SHARED) + slot  # the intermediate's row; slot TOPK (if SHARED): the shared expert
        routed = slot < TOPK
        expert = tl.load(Ids + t * TOPK + slot, mask=routed, other=0)
        valid = (expert >= 0) & (expert < NUM_EXPERTS)
        blk = Down + tl.where(valid, expert, 0).to(tl.int64) * HIDDEN * ROW_BYTES + rel
        if SHARED:
            if not routed:
                blk = SDown + rel
        grp = pair.to(tl.int64) * NG + grp0
        for _ in range(tl.where(valid, full, 0)):
            acc += block_dot(blk, all_blocks, AW + grp * 8, ADX + grp, AS + grp, x_all, FMT)
            blk += G * TS
            grp += G * GPB
        if full * G < NB:
            g_ok = (full * G + g) < NB
            acc += block_dot(blk, g_ok & valid, AW + grp * 8, ADX + grp, AS + grp, x_all & g_ok[None, :], FMT)
    y = tl.sum(tl.reshape(acc, [BLOCK_R, G]), axis=1)
    offs_h = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(Y + t.to(tl.int64) * STRIDE_YT + offs_h, y.to(Y.dtype.element_ty), mask=offs_h < HIDDEN)


def step_config(nb: int, num_warps: int) -> tuple[int, int]:
    """(rows per program, blocks per step G) for rows of ``nb`` blocks: 32 x num_warps blocks a step, one
    per thread (a row's blocks, or several rows when a row has fewer)."""
    g = min(triton.next_power_of_2(nb), 32 * num_warps)
    return max(1, 32 * num_warps // g), g



def mmvq_moe(
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
    block_i: int | None = None,
    values_per_step: int | None = None,
    block_h: int | None = None,
    values_per_step_down: int | None = None,
    num_warps: int | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """Σ_k weights[t, k] · down_e(silu(gate_e x[t]) · up_e x[t]) with e = ids[t, k], as [T, H] in x's dtype.

    Same contract and knobs as ``moe.quant_moe_decode`` (x [T, H] fp16 / bf16 / fp32; gate, up uint8
    [E, I, rbH] of ``gate_up_fmt`` blocks; down uint8 [E, H, rbI] of ``down_fmt`` blocks; ids int64 [T, k];
    weights fp32 [T, k]; an id outside [0, E) contributes zero and reads no weight), computed by int8 dot
    products: x and the intermediate silu(g)·u·weight are rounded to int8 per 32 values. A knob left None
    takes ``step_config``'s value (one block per thread and step).

    ``shared``: (gate [I, rbH], up [I, rbH], down [H, rbI]) of a shared expert in the same formats and
    shapes as one routed expert, run as one more slot of weight 1 in the same two launches (its own
    three launches otherwise): the result is then Σ_k ... + shared(x), the k + 1 terms summed in fp32 and
    rounded once to x's dtype.

    ``variant``: "base" (these kernels) or one of mmvq_moe_lanes.VARIANTS (lane-shared block reads at one
    token, per launch where the format has a lane reader); None: GLMTG_MMVQ_MOE_VARIANT (default "base").
    The knobs given apply to the lanes kernels too (values a step as blocks a step)."""
    fgu = mmvq_format(gate_up_fmt, "gate_up_fmt")
    fd = mmvq_format(down_fmt, "down_fmt")
    t, hidden, nb_h, nb_i, num_experts, inter, top_k, out = check_moe_args(x, gate, up, down, ids, weights,
                                                                          fgu, fd, out)
    if shared is not None:
        check(isinstance(shared, tuple) and len(shared) == 3
              and all(isinstance(w, torch.Tensor) for w in shared),
              lambda: f"shared must be a (gate, up, down) tuple of tensors, got {describe(shared)}")
        for name, w, like in zip(("shared gate", "shared up", "shared down"), shared, (gate, up, down)):
            check(w.dtype == torch.uint8 and tuple(w.shape) == tuple(like.shape[1:]) and w.device == x.device
                  and w.is_contiguous() and w.data_ptr() % 16 == 0,
                  lambda: f"{name} must be a contiguous 16-byte aligned uint8 tensor {tuple(like.shape[1:])} on "
                          f"{x.device} (one routed expert's shape), got {describe(w)}")
    slots = top_k + (shared is not None)
    lanes_gu = mmvq_moe_lanes.lanes_for(variant, fgu.name, nb_h, t)
    lanes_d = mmvq_moe_lanes.lanes_for(variant, fd.name, nb_i, t)
    given = (block_i, None if values_per_step is None else steps_for(fgu.block_size, values_per_step),
             block_h, None if values_per_step_down is None else steps_for(fd.block_size, values_per_step_down),
             num_warps)
    if x.is_cuda and num_warps is None and block_i is None and block_h is None and values_per_step is None \
            and values_per_step_down is None:
        # Measured fastest on an H200 at GLM-4.5-Air's experts (bench/DECISIONS.md H2): one row a program,
        # 1024 values a step, one warp.
        block_i, block_h, values_per_step, values_per_step_down, num_warps = 1, 1, 1024, 1024, 1
    num_warps = 4 if num_warps is None else num_warps
    auto_i, auto_gi = step_config(nb_h, num_warps)
    auto_h, auto_gh = step_config(nb_i, num_warps)
    block_i = auto_i if block_i is None else block_i
    block_h = auto_h if block_h is None else block_h
    values_per_step = auto_gi * fgu.block_size if values_per_step is None else values_per_step
    values_per_step_down = auto_gh * fd.block_size if values_per_step_down is None else values_per_step_down
    for name, value in (("block_i", block_i), ("values_per_step", values_per_step), ("block_h", block_h),
                        ("values_per_step_down", values_per_step_down), ("num_warps", num_warps)):
        check_power_of_two(name, value)
    if t == 0:
        return out

    ids, weights = ids.contiguous(), weights.contiguous()
    xw, xdx, xs = quantize_once(x)  # x's rounding shared with the shared expert's GEMVs (activation.py memo)
    # I is a whole number of down blocks, so of 32 values. block_i a multiple of 32: the gate/up programs
    # quantize the intermediate themselves (one launch fewer); else an fp32 buffer and quantize_activation.
    fused = block_i % GROUP == 0
    pdl, launch = enabled(x.device), launch_kwargs(x.device)
    sgate, sup, sdown = shared if shared is not None else (gate, up, down)  # never read without SHARED
    if lanes_gu:  # fp32 intermediate, then its rounding (as the unfused base path)
        act = torch.empty((t * slots, inter), dtype=torch.float32, device=x.device)
        mmvq_moe_lanes.launch_gate_up(xw, xdx, xs, gate, up, ids, weights, act, fgu, lanes_gu, shared, given[0],
                                      given[1], given[4], pdl)
        aw, adx, as_ = quantize_activation(act)
    else:
        aw = torch.empty((t * slots, inter), dtype=torch.int8, device=x.device)
        adx = torch.empty((t * slots, inter // GROUP), dtype=torch.float32, device=x.device)
        as_ = torch.empty((t * slots, inter // GROUP), dtype=torch.int32, device=x.device)
        act = adx if fused else torch.empty((t * slots, inter), dtype=torch.float32, device=x.device)
        _gate_up_kernel[(t * slots, triton.cdiv(inter, block_i))](
            xw.view(torch.int32), xdx, xs, gate, up, ids, weights, act, aw, adx, as_, nb_h, hidden // GROUP, inter,
            num_experts, top_k, gate.shape[2],
            FMT=fgu.gguf_type, BS=fgu.block_size, TS=fgu.type_size, BLOCK_R=block_i,
            G=steps_for(fgu.block_size, values_per_step), FUSED=fused, PDL=pdl, SGate=sgate, SUp=sup,
            SHARED=int(shared is not None), num_warps=num_warps, **launch,
        )
        if not fused:
            aw, adx, as_ = quantize_activation(act)
    if lanes_d:
        mmvq_moe_lanes.launch_down(aw, adx, as_, down, ids, out, fd, lanes_d, None if shared is None else sdown,
                                   given[2], given[3], given[4], pdl)
        return out
    _down_kernel[(t, triton.cdiv(hidden, block_h))](
        aw.view(torch.int32), adx, as_, down, ids, out, nb_i, inter // GROUP, hidden, num_experts, top_k,
        down.shape[2], out.stride(0),
        FMT=fd.gguf_type, BS=fd.block_size, TS=fd.type_size, BLOCK_R=block_h,
        G=steps_for(fd.block_size, values_per_step_down), PDL=pdl, SDown=sdown, SHARED=int(shared is not None),
        num_warps=num_warps, **launch,
    )
    return out
