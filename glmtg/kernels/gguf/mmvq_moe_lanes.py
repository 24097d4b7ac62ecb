"""The "lanes" variants of the routed-expert int8-dot kernels (mmvq_moe.py) at one token: the same two
launches (gate + up with SiLU-multiply, then down summed over the slots) and the same contract, with the
blocks read by neighbouring lanes (mmvq_lanes32.blocks32 for Q4_0 / Q5_0 / Q8_0, mmvq_lanes' reader for Q4_K)
instead of one thread a block with 16-bit loads.

Why: mmvq_moe's base kernels read GLM-4.5-Air's 8 experts + the shared one (77.9 MB in Q4_0) in ~40 µs where
a plain read of those bytes takes 20.6 (bench/DECISIONS.md H5): the same load-instruction bound as the dense
kernel (mmvq_lanes32's docstring). Two more changes besides the block readers:

- gate/up: one program per (slot, BLOCK_R rows), gate and up read in the same step (twice the loads in
  flight), as the base kernel; the fp32 intermediate then goes through activation.quantize_activation, as
  the base kernel's CUDA default (block_i 1) does.
- down: the row length (NB blocks, 44 at I = 1408) is a constexpr, so a slot's steps are unrolled into
  straight-line code: the loads of a slot's whole row can be in flight together, and the per-block offsets
  are computed once (a slot moves one scalar base). The default step divides the row (4 blocks x 11 steps,
  several rows a program: no partial step, no masked load), where the base kernel's 32-block steps leave
  the second 12 / 32 full. (A flat axis over all slots' blocks, tried first, spent ~50 instructions a
  block on index arithmetic: 3-4.4 instructions a value by `bench/gguf_gemv.py --sass --mmvq`.)

Variants (GLMTG_MMVQ_MOE_VARIANT, or mmvq_moe's ``variant``): "base" (mmvq_moe.py, the default until
measured), "lanes" (L = 2 lanes a 32-value block, Q4_K 4), "lanes-narrow" (L = 1: a thread a block, but
aligned 32-bit loads funnel-shifted), "lanes-wide" (L = 4, Q4_K 8), "lanes-auto" (per format the fewest
sm_90 instructions a value by `bench/gguf_gemv.py --sass --mmvq`: mmvq_lanes32.lanes32_auto; Q4_K 4). A
launch whose format has no lane reader here (or rows of an odd number of 32-value blocks: not 4-byte
aligned) keeps the base kernel; at T > 1 both launches keep it.

Numerics: each block's term is words.block_dot's fp32 value (mmvq_lanes32); only the fp32 summation order
of the block terms differs from the base kernels (the down sum also in its order of slots and blocks), so
the results agree with the base variant to fp32 summation order and then x's dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from glmtg.formats import BlockFormat
from glmtg.kernels.gguf.mmvq_lanes32 import LANES32_FORMATS, blocks32, lanes32_auto, q4_k_blocks
from glmtg.kernels.pdl import launch_kwargs, wait_and_release
from glmtg.switch import ModeSwitch

VARIANTS: tuple[str, ...] = ("base", "lanes", "lanes-narrow", "lanes-wide", "lanes-auto")
MOE_LANES_FORMATS: tuple[str, ...] = LANES32_FORMATS + ("q4_k",)
_L32 = {"lanes": 2, "lanes-narrow": 1, "lanes-wide": 4}  # lanes a 32-value block
_EK = {"lanes": 1, "lanes-narrow": 1, "lanes-wide": 2, "lanes-auto": 1}  # Q4_K: 4 · E lanes a block
_switch = ModeSwitch("GLMTG_MMVQ_MOE_VARIANT (the mmvq_moe kernel variant)", VARIANTS,
                     os.environ.get("GLMTG_MMVQ_MOE_VARIANT", "base"))
set_variant = _switch.set
variant_mode = _switch.scoped  # ``with mmvq_moe_lanes.variant_mode("lanes"): ...``


def current_variant() -> str:
    """The process-wide variant (GLMTG_MMVQ_MOE_VARIANT, or as set since)."""
    return _switch.value


def lanes_for(variant: str | None, fmt_name: str, nb: int, tokens: int) -> int:
    """Lanes a block (L for the 32-value types, E for Q4_K) if a launch on ``fmt_name`` rows of ``nb`` blocks
    runs this module's kernel under ``variant`` (None: the process-wide one), else 0 (the base kernel);
    ValueError naming ``variant`` if it is not one of VARIANTS."""
    v = _switch.value if variant is None else variant
    if v not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if v == "base" or tokens != 1 or fmt_name not in MOE_LANES_FORMATS:
        return 0
    if fmt_name == "q4_k":
        return _EK[v]
    if nb % 2:
        return 0
    return lanes32_auto(fmt_name) if v == "lanes-auto" else _L32[v]


def default_config(fmt_name: str, lanes: int, nb: int, down: bool) -> tuple[int, int, int]:
    """(rows per program, blocks per step G, num_warps), reasoned (not measured yet; bench/gguf_gemv.py
    --mmvq --sweep times others), one warp a program as the base kernels' measured default (bench/DECISIONS.md
    H2: many small programs in flight). gate/up: one row, 32 blocks a step (Q4_K 16: a 4096-value row in
    one step). down (``nb`` blocks a row, a constexpr there: the steps unrolled): G the largest power of two
    up to 16 that divides nb (Air's 44: 4, so no step is partial and no load masked) and as many rows as
    fill the warp's 32 lanes (L lanes a block; Q4_K 4 · E)."""
    if not down:
        return 1, (16 if fmt_name == "q4_k" else 32), 1
    per_block = 4 * lanes if fmt_name == "q4_k" else lanes
    g = 2 if fmt_name != "q4_k" else 1  # 32-value blocks: an even step (each block keeps its alignment)
    while g < 16 and nb % (2 * g) == 0:
        g *= 2
    return max(1, 32 // (g * per_block)), g, 1


@triton.jit
def _blocks(W, off, bm, XW, DX, XS, grp, FMT: tl.constexpr, L: tl.constexpr, MASKED: tl.constexpr):
    """A step's block terms, [B]: the Q4_K reader (L = E) or the 32-value one."""
    if FMT == 12:
        v = q4_k_blocks(W, off, bm, XW, DX, XS, grp, L, MASKED)
    else:
        v = blocks32(W, off, bm, XW, DX, XS, grp, FMT, L, MASKED)
    return v


@triton.jit
def _gate_up_lanes_kernel(XW, DX, XS, Gate, Up, SGate, SUp, Ids, Weights, Act, NB, NG, INTER, NUM_EXPERTS, TOPK,
                          ROW_BYTES, FMT: tl.constexpr, TS: tl.constexpr, GPB: tl.constexpr, BLOCK_R: tl.constexpr,
                          G: tl.constexpr, L: tl.constexpr, PDL: tl.constexpr = False, SHARED: tl.constexpr = 0):
    # SGate, SUp: the shared expert's matrices (read only with SHARED; the routed stacks otherwise)
    tl.static_assert((FMT == 12) or (G % 2 == 0), "lanes: an even number of 32-value blocks a step")
    B: tl.constexpr = BLOCK_R * G
    pair = tl.program_id(0)  # token * (TOPK + SHARED) + slot; slot TOPK (if SHARED) is the shared expert
    t = pair // (TOPK + SHARED)
    slot = pair % (TOPK + SHARED)
    routed = slot < TOPK
    wait_and_release(PDL)  # the ids come from the router, just before
    expert = tl.load(Ids + t * TOPK + slot, mask=routed, other=0)
    valid = (expert >= 0) & (expert < NUM_EXPERTS)  # the shared slot: expert 0, valid
    base = tl.where(valid, expert, 0).to(tl.int64) * INTER * ROW_BYTES  # int64: E·I·row_bytes > 2^31
    gate_rows, up_rows = Gate + base, Up + base
    if SHARED:
        if not routed:  # the shared expert: its own [I, row_bytes] matrices, weight 1
            gate_rows, up_rows = SGate + base * 0, SUp + base * 0
    idx = tl.arange(0, B)
    g = idx % G
    rows = tl.minimum(tl.program_id(1) * BLOCK_R + idx // G, INTER - 1)  # rows past INTER: not stored
    off = rows.to(tl.int64) * ROW_BYTES + g * TS  # loop-invariant; a step moves the bases by a scalar
    grp = t * NG + g * GPB
    all_blocks = idx >= 0
    nb = tl.where(valid, NB, 0)  # an invalid slot runs no step: reads no weight byte
    full = nb // G
    acc_g = tl.zeros((B,), tl.float32)
    acc_u = tl.zeros((B,), tl.float32)
    for k in range(full):
        acc_g += _blocks(gate_rows + k * (G * TS), off, all_blocks, XW, DX, XS, grp + k * (G * GPB), FMT, L, False)
        acc_u += _blocks(up_rows + k * (G * TS), off, all_blocks, XW, DX, XS, grp + k * (G * GPB), FMT, L, False)
    if full * G < nb:  # the last, partial step
        g_ok = (full * G + g) < nb
        acc_g += _blocks(gate_rows + full * (G * TS), off, g_ok, XW, DX, XS, grp + full * (G * GPB), FMT, L, True)
        acc_u += _blocks(up_rows + full * (G * TS), off, g_ok, XW, DX, XS, grp + full * (G * GPB), FMT, L, True)
    gv = tl.sum(tl.reshape(acc_g, [BLOCK_R, G]), axis=1)
    uv = tl.sum(tl.reshape(acc_u, [BLOCK_R, G]), axis=1)
    w = tl.where(valid, tl.load(Weights + t * TOPK + slot, mask=routed, other=1.0), 0.0)
    h = gv * tl.sigmoid(gv) * uv * w  # as mmvq_moe's; an invalid slot: silu(0) · 0 · 0 = 0
    offs_i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(Act + pair.to(tl.int64) * INTER + offs_i, h, mask=offs_i < INTER)


@triton.jit
def _down_lanes_kernel(AW, ADX, AS, Down, Ids, Y, NG, HIDDEN, NUM_EXPERTS, TOPK, ROW_BYTES, STRIDE_YT,
                       SHARED_OFF, NB: tl.constexpr, FMT: tl.constexpr, TS: tl.constexpr, GPB: tl.constexpr,
                       BLOCK_R: tl.constexpr, G: tl.constexpr, L: tl.constexpr, PDL: tl.constexpr = False,
                       SHARED: tl.constexpr = 0):
    # SHARED_OFF: the shared expert's down matrix, as a byte offset from Down (both 16-byte aligned). NB a
    # constexpr: a slot's steps are unrolled (straight-line code, so the loads of all of them can be in
    # flight together), and every per-block offset is loop-invariant (a slot moves the base by a scalar).
    B: tl.constexpr = BLOCK_R * G
    FULL: tl.constexpr = NB // G
    t = tl.program_id(0)
    wait_and_release(PDL)  # the ids and the intermediate come from the kernels before
    idx = tl.arange(0, B)
    g = idx % G
    rows = tl.minimum(tl.program_id(1) * BLOCK_R + idx // G, HIDDEN - 1)
    off = rows.to(tl.int64) * ROW_BYTES + g * TS
    all_blocks = idx >= 0
    acc = tl.zeros((B,), tl.float32)
    for slot in range(TOPK + SHARED):
        pair = t * (TOPK + SHARED) + slot  # the intermediate's row; slot TOPK (if SHARED): the shared expert
        routed = slot < TOPK
        expert = tl.load(Ids + t * TOPK + slot, mask=routed, other=0)
        if (expert >= 0) & (expert < NUM_EXPERTS):  # an invalid slot reads no weight byte, adds nothing
            mat = Down + expert.to(tl.int64) * HIDDEN * ROW_BYTES
            if SHARED:
                if not routed:
                    mat = Down + SHARED_OFF
            grp = pair * NG + g * GPB
            for k in tl.static_range(FULL):
                acc += _blocks(mat + k * (G * TS), off, all_blocks, AW, ADX, AS, grp + k * (G * GPB), FMT, L, False)
            if FULL * G < NB:  # the last, partial step
                acc += _blocks(mat + FULL * (G * TS), off, (FULL * G + g) < NB, AW, ADX, AS, grp + FULL * (G * GPB),
                               FMT, L, True)
    y = tl.sum(tl.reshape(acc, [BLOCK_R, G]), axis=1)
    offs_h = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(Y + t.to(tl.int64) * STRIDE_YT + offs_h, y.to(Y.dtype.element_ty), mask=offs_h < HIDDEN)


def launch_gate_up(xw: torch.Tensor, xdx: torch.Tensor, xs: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor, act: torch.Tensor, fmt: BlockFormat, lanes: int,
                   shared: tuple[torch.Tensor, ...] | None, block_r: int | None, blocks_per_step: int | None,
                   num_warps: int | None, pdl: bool) -> None:
    """The gate/up launch (operands checked by mmvq_moe): ``act`` fp32 [T · slots, I] gets
    weight · silu(g) · u; knobs left None take ``default_config``."""
    num_experts, inter, row_bytes = gate.shape
    nb = row_bytes // fmt.type_size
    d_r, d_g, d_w = default_config(fmt.name, lanes, nb, False)
    block_r = d_r if block_r is None else block_r
    g = d_g if blocks_per_step is None else blocks_per_step
    g = g if fmt.name == "q4_k" else max(g, 2)
    sgate, sup = (shared[0], shared[1]) if shared is not None else (gate, up)  # never read without SHARED
    _gate_up_lanes_kernel[(act.shape[0], triton.cdiv(inter, block_r))](
        xw.view(torch.int32), xdx, xs, gate, up, sgate, sup, ids, weights, act, nb, xdx.shape[1], inter,
        num_experts, ids.shape[1], row_bytes, FMT=fmt.gguf_type, TS=fmt.type_size, GPB=fmt.block_size // 32,
        BLOCK_R=block_r, G=g, L=lanes, PDL=pdl, SHARED=int(shared is not None),
        num_warps=d_w if num_warps is None else num_warps, **launch_kwargs(act.device),
    )


def launch_down(aw: torch.Tensor, adx: torch.Tensor, as_: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                out: torch.Tensor, fmt: BlockFormat, lanes: int, shared_down: torch.Tensor | None, block_h: int | None,
                blocks_per_step: int | None, num_warps: int | None, pdl: bool) -> None:
    """The down launch: ``out`` [T, H] = Σ over the slots of down_e · intermediate, rounded once."""
    num_experts, hidden, row_bytes = down.shape
    nb = row_bytes // fmt.type_size
    d_r, d_g, d_w = default_config(fmt.name, lanes, nb, True)
    block_h = d_r if block_h is None else block_h
    g = d_g if blocks_per_step is None else blocks_per_step
    g = g if fmt.name == "q4_k" else max(g, 2)
    shared_off = 0 if shared_down is None else shared_down.data_ptr() - down.data_ptr()
    _down_lanes_kernel[(out.shape[0], triton.cdiv(hidden, block_h))](
        aw.view(torch.int32), adx, as_, down, ids, out, adx.shape[1], hidden, num_experts, ids.shape[1],
        row_bytes, out.stride(0), shared_off, NB=nb, FMT=fmt.gguf_type, TS=fmt.type_size, GPB=fmt.block_size // 32,
        BLOCK_R=block_h, G=g, L=lanes, PDL=pdl, SHARED=int(shared_down is not None),
        num_warps=d_w if num_warps is None else num_warps, **launch_kwargs(out.device),
    )
