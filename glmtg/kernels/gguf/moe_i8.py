"""Routed experts of a decode batch by int8 tensor-core dots, q4_0 / q8_0 expert stacks: Σ_k weights[t, k] ·
down_e(silu(gate_e x_t) · up_e x_t), each selected expert's bytes read once for all its pairs.

Why beside moe_prefill at small_batch's launches (weights decoded to fp32, bf16 dots): that decode may bound a
decode batch, whose step must read ~112 of 128 experts a layer at 32 streams (see mmq_i8.py). Here, as there,
the pairs are grouped by expert on the device (moe_groups.group_pairs; sort_by_expert past its size) and a
program takes one m-tile of one expert's pairs (programs of absent tiles run no loop: the grids are fixed,
capturable); the blocks go to the tensor cores as int8 codes (mmq_i8.block_codes_dot):

- gate/up: x rounded to int8 per 32 values (activation.quantize_once), both products of a tile of 32 inner
  columns, act = silu(g) · u rounded to x's dtype (as torch's silu and mul), then to int8 per 32 values (those
  32 columns: activation.quantize_groups), stored in sorted pair order: the down product's input blocks;
- down: act codes x down rows, each pair's output row rounded to x's dtype at its pair index;
- combine: mmq_moe's (fp32 sum over the slots in order, one rounding; deterministic).

Numerics as the int8 decode kernel (mmvq_moe): x and act rounded to int8 per 32 values, integer dots exact,
scales and sums in fp32. Unmeasured: chosen by ``GLMTG_SMALL_BATCH_DOT=int8`` for A/B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.activation import quantize_groups
from glmtg.kernels.gguf.gemv import check_weight, decoded_format, output_for
from glmtg.kernels.gguf.mmq_i8 import I8_FORMATS, block_codes_dot
from glmtg.kernels.gguf.mmq_moe import _combine_kernel, _tile_rows, check_routing, sort_by_expert
from glmtg.kernels.gguf.moe_groups import MAX_PAIRS, group_pairs


@triton.jit
def _gate_up_kernel(XQ, DX, XS, Gate, Up, AQ, ADX, AS, Like, Order, PairEnds, E, TOP_K, H, I, NBH, NBI, ROW_BYTES,
                    Q4: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    e, rows, row_ok, has_tile = _tile_rows(PairEnds, E, BLOCK_E, BLOCK_M)
    # Rows of a partial tile read token 0 (valid; not stored): no load masks in the loop.
    tok = (tl.load(Order + rows, mask=row_ok, other=0) // TOP_K).to(tl.int64)
    jj = tl.arange(0, 32)
    a_ptrs = XQ + tok[:, None] * H + jj[None, :]
    s_ptrs = tok * NBH
    g = tl.program_id(1)  # this program's group of 32 inner columns
    rn = g * 32 + jj
    w_off = e.to(tl.int64) * I * ROW_BYTES + rn.to(tl.int64) * ROW_BYTES
    g_rows = Gate + w_off
    u_rows = Up + w_off
    acc_g = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    for _ in range(tl.where(has_tile, NBH, 0)):  # no tile: no loop
        a = tl.load(a_ptrs)
        xs = tl.load(XS + s_ptrs)
        dx = tl.load(DX + s_ptrs)[:, None]
        s, d = block_codes_dot(a, xs, g_rows, Q4)
        acc_g += s.to(tl.float32) * (dx * d[None, :])
        s, d = block_codes_dot(a, xs, u_rows, Q4)
        acc_u += s.to(tl.float32) * (dx * d[None, :])
        a_ptrs += 32
        s_ptrs += 1
        g_rows += TS
        u_rows += TS
    act = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(Like.dtype.element_ty).to(tl.float32)
    q, adx, asums = quantize_groups(act)
    rows64 = rows.to(tl.int64)
    tl.store(AQ + rows64[:, None] * I + rn[None, :], q.to(tl.int8), mask=row_ok[:, None])
    tl.store(ADX + rows64 * NBI + g, adx, mask=row_ok)
    tl.store(AS + rows64 * NBI + g, asums, mask=row_ok)


@triton.jit
def _down_kernel(AQ, ADX, AS, Down, Y, Order, PairEnds, E, H, I, NBI, ROW_BYTES, Q4: tl.constexpr,
                 TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    e, rows, row_ok, has_tile = _tile_rows(PairEnds, E, BLOCK_E, BLOCK_M)
    rows_in = tl.where(row_ok, rows, tl.min(rows, axis=0)).to(tl.int64)  # a partial tile reads its first row
    jj = tl.arange(0, 32)
    a_ptrs = AQ + rows_in[:, None] * I + jj[None, :]
    s_ptrs = rows_in * NBI
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = Down + e.to(tl.int64) * H * ROW_BYTES + tl.minimum(rn, H - 1).to(tl.int64) * ROW_BYTES
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(tl.where(has_tile, NBI, 0)):
        a = tl.load(a_ptrs)
        s, d = block_codes_dot(a, tl.load(AS + s_ptrs), w_rows, Q4)
        acc += s.to(tl.float32) * (tl.load(ADX + s_ptrs)[:, None] * d[None, :])
        a_ptrs += 32
        s_ptrs += 1
        w_rows += TS
    pair = tl.load(Order + rows, mask=row_ok, other=0).to(tl.int64)  # where this row's pair sits: t * k + slot
    ok = row_ok[:, None] & (rn < H)[None, :]
    tl.store(Y + pair[:, None] * H + rn[None, :], acc.to(Y.dtype.element_ty), mask=ok)


def moe_i8(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
           weights: torch.Tensor, gate_up_fmt: str | int, down_fmt: str | int, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``mmq_moe.moe_prefill``'s contract (x [T, H] fp16 / bf16 / fp32; gate/up uint8 [E, I, row bytes of H];
    down uint8 [E, H, row bytes of I]; ids int [T, k], outside [0, E) adding nothing; weights fp32 [T, k];
    -> [T, H] in x's dtype) for stacks in I8_FORMATS (q4_0, q8_0), by int8 dots (module docstring). Four
    launches (five past moe_groups.MAX_PAIRS pairs, with torch's sort), no host sync: capturable.
    Transients: act codes int8 [T·k, I] with their scales, per-pair outputs [T·k, H] in x's dtype."""
    from glmtg.kernels.gguf.activation import quantize_once

    gf = decoded_format(gate_up_fmt, "gate_up_fmt")
    df = decoded_format(down_fmt, "down_fmt")
    check(gf.name in I8_FORMATS and df.name in I8_FORMATS,
          lambda: f"moe_i8 reads {I8_FORMATS}, got gate/up {gf.name}, down {df.name}")
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, H], got {describe(x)}")
    t, h = x.shape
    nb_h = check_weight("gate", gate, gf, 3, x.device)
    check(isinstance(up, torch.Tensor) and up.shape == gate.shape,
          lambda: f"up must have gate's shape {tuple(gate.shape)}, got {describe(up)}")
    check_weight("up", up, gf, 3, x.device)
    nb_i = check_weight("down", down, df, 3, x.device)
    e, i = gate.shape[0], gate.shape[1]
    check(nb_h * 32 == h, lambda: f"gate rows hold {nb_h * 32} values but x has H={h}")
    check(tuple(down.shape[:2]) == (e, h) and nb_i * 32 == i,
          lambda: f"down must hold [{e}, {h}] rows of {i} values, got {tuple(down.shape)} of {nb_i * 32}")
    check_routing(ids, weights, x)
    k = ids.shape[1]
    pairs = t * k
    out = output_for(out, (t, h), x)
    if pairs == 0:
        return out
    xq, xdx, xs = quantize_once(x if x.stride(1) == 1 else x.contiguous())
    ids, weights = ids.contiguous(), weights.contiguous()
    order, ends = group_pairs(ids, e) if pairs <= MAX_PAIRS else sort_by_expert(ids, e)
    aq = torch.empty((pairs, i), dtype=torch.int8, device=x.device)
    adx = torch.empty((pairs, nb_i), dtype=torch.float32, device=x.device)
    asums = torch.empty((pairs, nb_i), dtype=torch.int32, device=x.device)
    y = torch.empty((pairs, h), dtype=x.dtype, device=x.device)
    block_e = triton.next_power_of_2(e)
    block_m, block_n = 16, (64 if x.is_cuda else 16)
    tiles = triton.cdiv(pairs, block_m) + e  # m-tiles over all experts, an upper bound
    _gate_up_kernel[(tiles, nb_i)](
        xq, xdx, xs, gate, up, aq, adx, asums, y, order, ends, e, k, h, i, nb_h, nb_i, gate.shape[2],
        Q4=gf.name == "q4_0", TS=gf.type_size, BLOCK_M=block_m, BLOCK_E=block_e, num_warps=4, num_stages=3)
    _down_kernel[(tiles, triton.cdiv(h, block_n))](
        aq, adx, asums, down, y, order, ends, e, h, i, nb_i, down.shape[2], Q4=df.name == "q4_0",
        TS=df.type_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=block_e, num_warps=4, num_stages=3)
    block_t, block_h = (16, 256) if x.is_cuda else (16, 64)
    _combine_kernel[(triton.cdiv(t, block_t), triton.cdiv(h, block_h))](
        y, ids, weights, out, t, h, e, TOP_K=k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out
