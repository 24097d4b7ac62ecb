"""Activations rounded to int8 per 32 values for the int8-dot GEMVs (mmvq.py, mmvq_moe.py), and a memo so
that one activation is rounded once when several weights read it.

``quantize_activation(x)``: x [T, K] -> (codes int8 [T, K], dx fp32 [T, K/32], code sums int32 [T, K/32]),
q8_1 style: dx = amax / 127, codes rounded to nearest, each group's code sum (for weight formats with
offsets). ``silu_mul_quantize(gate_up)``: the same blocks of silu(gate) · up straight from the fused
gate/up output, in one launch instead of three (silu, mul, quantize), with torch's roundings.

The memo (``remember`` / ``quantized_of``): q/k/v read the same normed x, and the shared expert and the
routed experts read the same x; without it each GEMV would re-round x (a dependent launch each).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from glmtg.kernels._checks import capturing, check, describe
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

GROUP: int = 32  # activation values per int8 scale
MEMO_SIZE: int = 4  # activations remembered at once: a layer reads a handful, one after the other


@triton.jit
def quantize_groups(v):
    """fp32 [GB, 32] groups -> (codes int32 [GB, 32], dx fp32 [GB], code sums int32 [GB]): dx = amax / 127,
    codes = v · (127 / amax) rounded to nearest (0 for an all-zero group)."""
    amax = tl.max(tl.abs(v), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)  # no 1/0 evaluated
    # Round to nearest even by the 1.5 * 2^23 trick (exact for |v| < 2^22); |v * inv| <= 127 (+ rounding).
    q = (v * inv[:, None] + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    return q, amax / 127.0, tl.sum(q, axis=1)


@triton.jit
def _quantize_kernel(X, Q, DX, S, NG, STRIDE_XT, GB: tl.constexpr, PDL: tl.constexpr = False):
    # One program: GB groups of 32 values of one token.
    t = tl.program_id(0).to(tl.int64)
    wait_and_release(PDL)
    g = tl.program_id(1) * GB + tl.arange(0, GB)
    j = tl.arange(0, 32)
    ok = (g < NG)[:, None]
    offs = g[:, None] * 32 + j[None, :]
    v = tl.load(X + t * STRIDE_XT + offs, mask=ok, other=0.0).to(tl.float32)
    q, dx, sums = quantize_groups(v)
    tl.store(Q + t * (NG * 32) + offs, q.to(tl.int8), mask=ok)
    gm = g < NG
    tl.store(DX + t * NG + g, dx, mask=gm)
    tl.store(S + t * NG + g, sums, mask=gm)


@triton.jit
def _silu_mul_quantize_kernel(GU, Q, DX, S, NG, STRIDE_T, GB: tl.constexpr, PRECISE_EXP: tl.constexpr,
                              PDL: tl.constexpr = False):
    # One program: GB groups of 32 intermediate values of one token; gate at [0, I), up at [I, 2I).
    t = tl.program_id(0).to(tl.int64)
    wait_and_release(PDL)
    g = tl.program_id(1) * GB + tl.arange(0, GB)
    j = tl.arange(0, 32)
    ok = (g < NG)[:, None]
    offs = g[:, None] * 32 + j[None, :]
    row = GU + t * STRIDE_T
    gate = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(row + NG * 32 + offs, mask=ok, other=0.0)
    # torch's silu: x / (1 + exp(-x)) in fp32 with an accurate expf and an IEEE division, rounded to the
    # dtype. tl.exp and fp32 "/" lower to approximations on the GPU, so libdevice's expf and div_rn there;
    # the interpreter has no libdevice (its tl.exp is numpy's).
    if PRECISE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    s = tl.math.div_rn(gate, 1.0 + e).to(up.dtype)
    # torch's mul: the product in fp32 (exact for fp16 / bf16 operands), rounded to the dtype.
    a = (s.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
    q, dx, sums = quantize_groups(a)
    tl.store(Q + t * (NG * 32) + offs, q.to(tl.int8), mask=ok)
    gm = g < NG
    tl.store(DX + t * NG + g, dx, mask=gm)
    tl.store(S + t * NG + g, sums, mask=gm)


def _blocks(t: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (codes, dx, sums) for an activation [t, k]."""
    ng = k // GROUP
    return (torch.empty((t, k), dtype=torch.int8, device=device),
            torch.empty((t, ng), dtype=torch.float32, device=device),
            torch.empty((t, ng), dtype=torch.int32, device=device))


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] float -> (codes int8 [T, K], dx fp32 [T, K/32], code sums int32 [T, K/32]).

    Per group of 32 values: dx = amax / 127 and codes = round(x / dx) (0 where amax is 0), so that
    x ≈ codes · dx; the code sums serve weight formats with offsets (Σ (q - o)·xq = Σ q·xq - o·Σxq)."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point(),
          lambda: f"x must be a 2-D float tensor [T, K], got {describe(x)}")
    t, k = x.shape
    check(k % GROUP == 0, lambda: f"x: K={k} is not a multiple of {GROUP}")
    codes, dx, sums = _blocks(t, k, x.device)
    if t == 0 or k == 0:
        return codes, dx, sums
    x = x if x.stride(1) == 1 else x.contiguous()
    ng = k // GROUP
    gb = 32
    _quantize_kernel[(t, triton.cdiv(ng, gb))](x, codes, dx, sums, ng, x.stride(0), GB=gb, PDL=enabled(x.device),
                                                    num_warps=4, **launch_kwargs(x.device))
    return codes, dx, sums


def silu_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_up [T, 2I] (gate then up, fp16 / bf16 / fp32) -> quantize_activation(F.silu(gate) * up), in one
    launch: (codes int8 [T, I], dx fp32 [T, I/32], code sums int32 [T, I/32]).

    Roundings are torch's in gate_up's dtype: g = round(silu(gate) in fp32), a = round(g · up in fp32),
    then a is rounded to int8 per 32 values as ``quantize_activation``. On a GPU silu uses the accurate
    expf and an IEEE division, as torch's CUDA silu, so the codes equal the torch expression's bit for bit;
    the interpreter (no libdevice) uses numpy's exp, which differs from torch's CPU exp in the last bit."""
    check(isinstance(gate_up, torch.Tensor) and gate_up.dim() == 2
          and gate_up.dtype in (torch.float16, torch.bfloat16, torch.float32),
          lambda: f"gate_up must be a 2-D fp16 / bf16 / fp32 tensor [T, 2I], got {describe(gate_up)}")
    t, width = gate_up.shape
    check(width % (2 * GROUP) == 0,
          lambda: f"gate_up: width {width} is not 2I with I a multiple of {GROUP}")
    inter = width // 2
    codes, dx, sums = _blocks(t, inter, gate_up.device)
    if t == 0 or inter == 0:
        return codes, dx, sums
    gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
    ng = inter // GROUP
    gb = min(32, triton.next_power_of_2(ng))
    _silu_mul_quantize_kernel[(t, triton.cdiv(ng, gb))](
        gate_up, codes, dx, sums, ng, gate_up.stride(0), GB=gb, PRECISE_EXP=gate_up.is_cuda,
        PDL=enabled(gate_up.device), num_warps=4, **launch_kwargs(gate_up.device),
        # torch's CUDA kernels keep fp32 subnormals; libdevice's expf then takes the same path
        enable_reflect_ftz=False,
    )
    return codes, dx, sums


def checked_quantized(q: object, t: int, k: int, device: torch.device,
                      what: str = "quantized") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` if it is a quantize_activation result for an activation [t, k] on ``device``, else ValueError
    naming ``what``."""
    want = ((torch.int8, (t, k)), (torch.float32, (t, k // GROUP)), (torch.int32, (t, k // GROUP)))
    check(isinstance(q, tuple) and len(q) == 3 and all(
        isinstance(v, torch.Tensor) and v.dtype == dt and tuple(v.shape) == sh and v.device == device
        and v.is_contiguous() for v, (dt, sh) in zip(q, want)),
        lambda: f"{what} must be quantize_activation(x)'s (codes, dx, sums) for x {(t, k)} on {device}")
    return q


# The memo: activations and their int8 blocks, most recent first. Why it is safe:
# - Key: the tensor object itself (a weakref, so the memo keeps no activation alive, and an entry dies with
#   its tensor: a new tensor at the same address, or with the same Python id, is another object and never
#   matches) and its version counter (every in-place torch op on it or on a view of its storage bumps it,
#   so a modified tensor never matches); data pointer, shape, strides and dtype are compared as well.
# - Kernels that write a caller's tensor behind torch's back (Triton launchers with out=) must bump its
#   version (torch.autograd.graph.increment_version), as mmvq does for its ``out``.
# - CUDA graphs: the lookup is host-side only (identity and version; nothing is read back from the
#   device), so it captures. An entry also records whether it was made during a capture and matches only
#   in the same state: a quantization made before a capture is never reused inside it (the graph would not
#   contain the quantize kernel and its replays would read codes never refreshed), and one made inside a
#   capture (its kernel is in the graph, rerun on every replay before the readers) is not used outside.
# - Inference-mode tensors have no version counter: they are never remembered.
_memo: list[tuple] = []


def _signature(x: torch.Tensor) -> tuple:
    """What must be unchanged for a remembered quantization of x to still be x's."""
    return (x._version, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, capturing(x.device))


def _drop(ref: weakref.ref) -> None:
    # x died: free its codes now (the memo must not hold memory for tensors that are gone)
    _memo[:] = [e for e in _memo if e[0] is not ref]


def remember(x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Record ``quantized`` (quantize_activation(x)'s result) as x's int8 blocks, for ``quantized_of``.
    Keeps no reference to x; the oldest entry goes when the memo holds MEMO_SIZE."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor, got {describe(x)}")
    t, k = x.shape
    check(k % GROUP == 0, lambda: f"x: K={k} is not a multiple of {GROUP}")
    checked_quantized(quantized, t, k, x.device)
    if x.is_inference():
        return
    _memo[:] = [e for e in _memo if e[0]() is not x]
    _memo.insert(0, (weakref.ref(x, _drop), _signature(x), quantized))
    del _memo[MEMO_SIZE:]


def quantized_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The int8 blocks remembered for x (that tensor or a same-layout view of it), unmodified since (else
    None)."""
    if not isinstance(x, torch.Tensor) or x.is_inference():
        return None
    for ref, signature, quantized in _memo:
        # The remembered tensor itself, or a view of it with the same layout (the reshape a consumer makes):
        # while that tensor lives its memory is no one else's, and views share its version counter, so an
        # equal signature means the same unchanged values.
        if ref() is not None and signature == _signature(x):
            return quantized
    return None


def forget() -> None:
    """Drop every remembered quantization (e.g. after writing activations by means that bump no version)."""
    _memo.clear()


def quantize_once(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's int8 blocks: the remembered ones if x is unchanged since, else quantize_activation(x),
    remembered."""
    quantized = quantized_of(x)
    if quantized is None:
        quantized = quantize_activation(x)
        remember(x, quantized)
    return quantized
