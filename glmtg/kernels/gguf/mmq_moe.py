"""Routed experts for many tokens (MoE prefill), GGUF expert stacks dequantized tile by tile into tensor-core
dots, grouped by expert: Σ_k weights[t, k] · down_e(silu(gate_e x_t) · up_e x_t).

Why: at prefill every expert gets many (token, slot) pairs, so each expert is a small GEMM and must run on
the tensor cores; the torch path dequantizes each expert's matrices (a transient per expert) and reads the
per-expert counts on the host (one sync per layer). Here the pairs are sorted by expert on the device
(``sort_by_expert``) and each projection is one launch with no host read:

- the grid's first axis is an upper bound on the m-tiles over all experts, cdiv(P, BLOCK_M) + E (P = T·k
  pairs; each expert's last tile may be partial), the second the n-tiles. A program finds its expert from
  the cumulative tile counts (scanned in the program from the pair offsets) and its rows from the pair
  offsets (``ends``; up to moe_groups.MAX_PAIRS pairs are grouped by ``moe_groups.group_pairs`` in one
  launch, more by ``sort_by_expert``);
  programs past the last tile run no K loop and store nothing.
- gate/up: one launch computes both products of the same rows and columns (two accumulators, each x tile
  loaded once for both) and stores act = silu(g) · u (fp32, rounded once to x's dtype) in sorted pair order.
- down: act rows (contiguous, sorted order) times the expert's down rows; each pair's output row, rounded
  to x's dtype, is stored at its pair index (the sort's ``order``): a scatter in which every row is written
  by exactly one program.
- combine: out[t] = round(Σ_s weights[t, s] · y[t, s]) in fp32 over the slots s = 0..k-1 in order, slots
  with an expert outside [0, E) adding nothing. A fixed order of additions: deterministic (no atomics).

Rounding order as the torch paths (glmtg/layers/moe.py, quant_experts.py): weights rounded to x's dtype,
each expert output rounded to x's dtype, weighted and summed in fp32, rounded once. The difference is
inside one expert: g and u are not rounded before silu · mul (one rounding of act instead of four).
Per-tile loop and decoders: mmq.py's ``mmq_tile`` (every format in ``decode.DECODED``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.gemv import check_weight, decoded_format, output_for
from glmtg.kernels.gguf.mmq import (
    MmqConfig,
    check_config,
    check_dot_dtype,
    fp32_config,
    launch_fitted,
    mmq_tile,
)
from glmtg.kernels.gguf.moe_groups import MAX_PAIRS as GROUP_MAX_PAIRS
from glmtg.kernels.gguf.moe_groups import group_pairs
from glmtg.kernels.gguf.tables import lookup_table

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_rows(PairEnds, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's expert e, its rows of the sorted pairs [BLOCK_M] and their validity, and whether the
    program has a tile at all (programs past the last expert's last tile have none). The experts' tile
    counts come from the pair offsets here (a scan of E values a program), not from a torch op per launch."""
    j = tl.program_id(0)
    ee = tl.arange(0, BLOCK_E)
    pair_ends = tl.load(PairEnds + ee, mask=ee < E, other=0)
    pair_starts = tl.load(PairEnds + ee - 1, mask=(ee > 0) & (ee < E), other=0)
    tiles = (pair_ends - pair_starts + BLOCK_M - 1) // BLOCK_M  # 0 past E (both loads give 0)
    tile_ends = tl.where(ee < E, tl.cumsum(tiles, axis=0), 2147483647)
    e = tl.sum((tile_ends <= j).to(tl.int32), axis=0)  # experts whose tiles all come before tile j
    has_tile = e < E
    e = tl.minimum(e, E - 1)
    tile_begin = tl.sum(tl.where(ee < e, tiles, 0), axis=0)  # tiles of the experts before e
    pair_begin = tl.load(PairEnds + e - 1, mask=e > 0, other=0)
    pair_end = tl.load(PairEnds + e)
    rows = pair_begin + (j - tile_begin) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < pair_end) & has_tile
    return e, rows, row_ok, has_tile


@triton.jit
def _gate_up_kernel(X, Gate, Up, Act, Order, PairEnds, Aux, E, TOP_K, H, I, NB, ROW_BYTES, STRIDE_XT,
                    FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr):
    e, rows, row_ok, has_tile = _tile_rows(PairEnds, E, BLOCK_E, BLOCK_M)
    # Rows of a partial tile read token 0 (a valid row; not stored): the full K steps need no load masks.
    tok = tl.load(Order + rows, mask=row_ok, other=0) // TOP_K
    kk = tl.arange(0, G * BS)
    a_ptrs = X + tok.to(tl.int64)[:, None] * STRIDE_XT + kk[None, :]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_off = e.to(tl.int64) * I * ROW_BYTES + tl.minimum(rn, I - 1).to(tl.int64) * ROW_BYTES
    nb = tl.where(has_tile, NB, 0)  # no tile: no K loop
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g, u = mmq_tile(zero, zero, a_ptrs, tl.full([BLOCK_M], True, tl.int1), Gate + w_off, Up + w_off, H, nb, Aux,
                    FMT, BS, TS, BLOCK_N, G, IEEE, True)
    act = g / (1.0 + tl.exp(-g)) * u
    ok = row_ok[:, None] & (rn < I)[None, :]
    tl.store(Act + rows.to(tl.int64)[:, None] * I + rn[None, :], act.to(Act.dtype.element_ty), mask=ok)


@triton.jit
def _down_kernel(Act, Down, Y, Order, PairEnds, Aux, E, H, I, NB, ROW_BYTES,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr):
    e, rows, row_ok, has_tile = _tile_rows(PairEnds, E, BLOCK_E, BLOCK_M)
    # Rows of a partial tile read the tile's first row (valid whenever there is a tile; not stored).
    rows_in = tl.where(row_ok, rows, tl.min(rows, axis=0))
    kk = tl.arange(0, G * BS)
    a_ptrs = Act + rows_in.to(tl.int64)[:, None] * I + kk[None, :]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = Down + e.to(tl.int64) * H * ROW_BYTES + tl.minimum(rn, H - 1).to(tl.int64) * ROW_BYTES
    nb = tl.where(has_tile, NB, 0)
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = mmq_tile(zero, zero, a_ptrs, tl.full([BLOCK_M], True, tl.int1), w_rows, w_rows, I, nb, Aux, FMT, BS, TS,
                      BLOCK_N, G, IEEE, False)
    pair = tl.load(Order + rows, mask=row_ok, other=0)  # where this row's pair sits: t * k + slot
    ok = row_ok[:, None] & (rn < H)[None, :]
    tl.store(Y + pair.to(tl.int64)[:, None] * H + rn[None, :], acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _combine_kernel(Y, Ids, Weights, Out, T, H, E, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for s in tl.static_range(TOP_K):  # slots in order: a fixed sum, deterministic
        p = t.to(tl.int64) * TOP_K + s
        e = tl.load(Ids + p, mask=t < T, other=-1)
        ok = (e >= 0) & (e < E) & (t < T)  # rows of other slots were never written: not read
        w = tl.load(Weights + p, mask=ok, other=0.0)
        y = tl.load(Y + p[:, None] * H + h[None, :], mask=ok[:, None] & (h < H)[None, :], other=0.0)
        acc += w[:, None] * y.to(tl.float32)
    tl.store(Out + t.to(tl.int64)[:, None] * H + h[None, :], acc.to(Out.dtype.element_ty),
             mask=(t < T)[:, None] & (h < H)[None, :])


# ---------------------------------------------------------------------------------------------- config


def default_moe_config(block_size: int, pairs: int, experts: int, on_gpu: bool, fused_pair: bool,
                       fp32: bool = False) -> MmqConfig:
    """The launch of one projection: BLOCK_M near the mean pairs per expert (16..128: fewer padded rows in
    each expert's last tile), the rest as ``mmq.default_config``; ``fused_pair`` (gate+up: two
    accumulators) halves BLOCK_N to keep the registers; ``fp32`` x takes ``mmq.fp32_config``. Reasoned,
    not measured (bench/gguf_gemm.py)."""
    bs = max(block_size, 1)
    mean = max(1, pairs // max(1, experts))
    if not on_gpu:
        return MmqConfig(block_m=min(32, max(16, triton.next_power_of_2(mean))), block_n=64,
                         block_k=max(32, bs), num_warps=4, num_stages=1)
    if fp32:
        return fp32_config(bs)
    block_m = min(128, max(16, triton.next_power_of_2(mean)))
    block_n = (64 if bs >= 256 else 128) // (2 if fused_pair else 1)
    num_warps = 8 if block_m >= 64 or bs >= 256 else 4  # a decoded [BLOCK_N, 256] tile needs 8 warps' registers
    return MmqConfig(block_m, block_n, max(64, bs), num_warps, num_stages=2 if bs >= 256 else 3)


# ---------------------------------------------------------------------------------------------- launchers


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (order int64 [T·k]: pair indices t·k + slot sorted by expert, stably; ends int32 [E]:
    pairs routed to experts <= e), on the device, nothing read back. Ids outside [0, num_experts) sort last
    and are in no expert's range."""
    flat = ids.reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_ids, order = flat.sort(stable=True)
    experts = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)


def check_routing(ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> None:
    """ValueError unless ids is an int32/int64 [T, k] tensor for x's T tokens on x's device and weights a
    float32 tensor of ids' shape there (the router's top-k for the grouped expert kernels)."""
    t = x.shape[0]
    check(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == t
          and ids.dtype in (torch.int32, torch.int64) and ids.device == x.device,
          lambda: f"ids must be an int32/int64 tensor [{t}, k] on {x.device}, got {describe(ids)}")
    check(isinstance(weights, torch.Tensor) and weights.shape == ids.shape and weights.dtype == torch.float32
          and weights.device == x.device,
          lambda: f"weights must be a float32 tensor {tuple(ids.shape)} on {x.device}, got {describe(weights)}")


def moe_prefill(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor, gate_up_fmt: str | int, down_fmt: str | int, *,
                out: torch.Tensor | None = None, gate_up_config: MmqConfig | None = None, down_config: MmqConfig | None = None) -> torch.Tensor:
    """x [T, H] (fp16, bf16 or fp32), expert stacks of GGUF blocks gate/up uint8 [E, I, row bytes of H] in
    ``gate_up_fmt`` and down uint8 [E, H, row bytes of I] in ``down_fmt``, ids int [T, k] (ids outside
    [0, E) add nothing), weights fp32 [T, k] -> Σ_k weights · down_e(silu(gate_e x) · up_e x), [T, H] in x's
    dtype. Four launches plus a few small torch ops (sort, offsets), no host sync: capturable.

    Transients: act [T·k, I] and the per-pair outputs [T·k, H], both in x's dtype. Rounding: see the module
    docstring. ``out``: a contiguous [T, H] tensor in x's dtype to write, or None for a new one.
    ``*_config``: the launches (``default_moe_config`` when None)."""
    gf = decoded_format(gate_up_fmt, "gate_up_fmt")
    df = decoded_format(down_fmt, "down_fmt")
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, H], got {describe(x)}")
    check_dot_dtype(x)
    t, h = x.shape
    nb_h = check_weight("gate", gate, gf, 3, x.device)
    check(isinstance(up, torch.Tensor) and up.shape == gate.shape,
          lambda: f"up must have gate's shape {tuple(gate.shape)}, got {describe(up)}")
    check_weight("up", up, gf, 3, x.device)
    nb_i = check_weight("down", down, df, 3, x.device)
    e, i = gate.shape[0], gate.shape[1]
    check(e >= 1 and i >= 1, lambda: f"gate must hold at least one expert of at least one row, got {tuple(gate.shape)}")
    check(nb_h * gf.block_size == h, lambda: f"gate rows hold {nb_h * gf.block_size} values but x has H={h}")
    check(tuple(down.shape[:2]) == (e, h) and nb_i * df.block_size == i,
          lambda: f"down must hold [{e}, {h}] rows of {i} values, got {tuple(down.shape)} of "
                  f"{nb_i * df.block_size}")
    check_routing(ids, weights, x)
    k = ids.shape[1]
    pairs = t * k
    on_gpu = x.is_cuda
    fp32 = x.dtype == torch.float32
    gcfg = default_moe_config(gf.block_size, pairs, e, on_gpu, True, fp32) if gate_up_config is None else gate_up_config
    dcfg = default_moe_config(df.block_size, pairs, e, on_gpu, False, fp32) if down_config is None else down_config
    check_config(gcfg, gf.block_size)
    check_config(dcfg, df.block_size)
    out = output_for(out, (t, h), x)
    if pairs == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    ids, weights = ids.contiguous(), weights.contiguous()
    # A decode batch's pairs grouped in one launch; prefill's many pairs by torch's sort.
    order, ends = group_pairs(ids, e) if pairs <= GROUP_MAX_PAIRS else sort_by_expert(ids, e)
    act = torch.empty((pairs, i), dtype=x.dtype, device=x.device)
    y = torch.empty((pairs, h), dtype=x.dtype, device=x.device)
    block_e = triton.next_power_of_2(e)
    ieee = fp32

    # The grids depend on BLOCK_M (tiles per expert) and so do the tile offsets: both from the launch tried.
    def gate_up_launch(c: MmqConfig) -> None:
        _gate_up_kernel[(triton.cdiv(pairs, c.block_m) + e, triton.cdiv(i, c.block_n))](
            x, gate, up, act, order, ends, lookup_table(gf.name, x.device), e, k, h,
            i, nb_h, gate.shape[2], x.stride(0), FMT=gf.gguf_type, BS=gf.block_size, TS=gf.type_size,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_E=block_e, G=c.block_k // max(gf.block_size, 1),
            IEEE=ieee, num_warps=c.num_warps, num_stages=c.num_stages)

    def down_launch(c: MmqConfig) -> None:
        _down_kernel[(triton.cdiv(pairs, c.block_m) + e, triton.cdiv(h, c.block_n))](
            act, down, y, order, ends, lookup_table(df.name, x.device), e, h, i,
            nb_i, down.shape[2], FMT=df.gguf_type, BS=df.block_size, TS=df.type_size, BLOCK_M=c.block_m,
            BLOCK_N=c.block_n, BLOCK_E=block_e, G=c.block_k // max(df.block_size, 1), IEEE=ieee,
            num_warps=c.num_warps, num_stages=c.num_stages)

    launch_fitted(("moe_gate_up", gf.name, x.dtype, x.device), gcfg, gate_up_launch)
    launch_fitted(("moe_down", df.name, x.dtype, x.device), dcfg, down_launch)
    block_t, block_h = (16, 256) if on_gpu else (16, 64)
    _combine_kernel[(triton.cdiv(t, block_t), triton.cdiv(h, block_h))](
        y, ids, weights, out, t, h, e, TOP_K=k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out
