"""Fused RMSNorm for decode: [residual add +] normalise + weight [+ int8 activation blocks], one launch.

Why: the torch RMSNorm (glmtg/layers/norm.py) is ~8 small kernels, the residual add before it one more,
and the MMVQ path quantizes the normalised activations in a launch of its own; at decode (T <= 16) each
of those launches costs more than its arithmetic. Here one program per token row does all of it.

Numerics, step by step the same as the torch code (rsqrt is the hardware approximation on both sides),
so that a result matches it bit for bit unless the fp32 sum of squares differs (see below):
  s = round(x + residual)                     (fp32 add, one rounding to x's dtype: torch's ``x + residual``)
  r = rsqrt(sum(s_f32^2) * fp32(1/H) + eps)   (fp32; times the reciprocal, as torch's CUDA ``mean`` does)
  y = round(weight_f32 * round(s_f32 * r))    (normalise in fp32, round, then the weight product rounded once)
The sum of squares is a tree reduction whose order differs from torch's, so the fp32 statistic may differ
by an fp32 ulp or two; the normalised value then differs from torch's by at most one ulp of x's dtype, in a
small fraction of the elements (~1e-4 in bf16), and y by that times |weight| plus the product's rounding;
nothing differs where the sum is exact in fp32 (tests/kernels/test_rms_norm.py checks both on a GPU). The
int8 blocks quantize the rounded y with ``quantize_groups``, so they equal ``quantize_activation(y)`` bit
for bit.

Launch: the whole row is one tile of next_power_of_2(H) values (masked past H), so x is read once; the
warps grow with the tile (~16 values a thread, at most 16 warps). H is capped at MAX_H to bound registers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.gguf.mmvq import GROUP, quantize_groups
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
MAX_H: int = 65536  # one tile a row: beyond this the tile would spill far out of registers


class Quantized(NamedTuple):
    """quantize_activation(y)'s result: a plain 3-tuple to mmvq's ``quantized=``."""

    codes: torch.Tensor  # int8 [T, H]
    dx: torch.Tensor  # fp32 [T, H / 32]
    sums: torch.Tensor  # int32 [T, H / 32]


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, Q, DX, QS, H, STRIDE_X, STRIDE_R, INV_H, EPS,
                     BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr, PDL: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    wait_and_release(PDL)
    dt = X.dtype.element_ty
    x = tl.load(X + t * STRIDE_X + offs, mask=ok, other=0.0)
    if RESIDUAL:
        r = tl.load(R + t * STRIDE_R + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)  # the new residual stream, rounded as torch's add
        tl.store(S + t * H + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) * INV_H + EPS)  # masked lanes are 0: they add nothing
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    # Round the normalised value to x's dtype before the weight, as the module does.
    y = (w * (xf * inv_rms).to(dt).to(tl.float32)).to(dt)
    tl.store(Y + t * H + offs, y, mask=ok)
    if QUANTIZE:
        # The rounded y, as quantize_activation would load it. Groups past H are all 0 and not stored.
        NG: tl.constexpr = BLOCK // 32
        q, dx, sums = quantize_groups(tl.reshape(y.to(tl.float32), [NG, 32]))
        tl.store(Q + t * H + offs, tl.reshape(q.to(tl.int8), [BLOCK]), mask=ok)
        g = tl.arange(0, NG)
        gm = g < H // 32
        tl.store(DX + t * (H // 32) + g, dx, mask=gm)
        tl.store(QS + t * (H // 32) + g, sums, mask=gm)


def _num_warps(block: int) -> int:
    """~16 values a thread, 1 to 16 warps (a decode launch has only T programs: each should be wide)."""
    return max(1, min(16, block // 512))


def _inv(h: int) -> float:
    """fp32(1 / h), the factor torch's CUDA ``mean`` multiplies the sum by (a float division in fp32)."""
    return float(np.float32(1.0) / np.float32(h))


def _check_rows(name: str, t: object, x: torch.Tensor) -> None:
    """ValueError naming ``name`` unless ``t`` is a tensor like x (shape, dtype, device) with contiguous rows."""
    check(isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device,
          lambda: f"{name} must be {describe(x)} like x, got {describe(t)}")
    check(t.shape[1] == 1 or t.stride(1) == 1,
          lambda: f"{name} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             quantize: bool = False) -> torch.Tensor | tuple:
    """RMSNorm of x [T, H] (fp16, bf16 or fp32; rows contiguous) with weight [H] of x's dtype, one launch.

    Returns, all new contiguous tensors:
      residual None, quantize False: y                  [T, H], x's dtype
      residual given:                (y, s)             s = round(x + residual), the new residual stream,
                                                        and y = norm(s)
      quantize True:                 (y, q) or (y, s, q) with q = Quantized(codes, dx, sums) ==
                                                        quantize_activation(y) (H a multiple of 32)
    The rounding order is the module's (module docstring): y equals glmtg.layers.norm.RMSNorm's output up
    to the fp32 sum-of-squares order."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, H], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, h = x.shape
    check(1 <= h <= MAX_H, lambda: f"x: H={h} must be in 1..{MAX_H}")
    check(h == 1 or x.stride(1) == 1, lambda: f"x rows must be contiguous (stride(1) == 1), got strides {x.stride()}")
    check(isinstance(weight, torch.Tensor) and tuple(weight.shape) == (h,) and weight.dtype == x.dtype
          and weight.device == x.device and weight.is_contiguous(),
          lambda: f"weight must be a contiguous {x.dtype} [{h}] tensor on {x.device}, got {describe(weight)}")
    check(isinstance(eps, (float, int)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0,
          lambda: f"eps must be a finite number > 0, got {describe(eps)}")
    if residual is not None:
        _check_rows("residual", residual, x)
    check(isinstance(quantize, bool), lambda: f"quantize must be a bool, got {describe(quantize)}")
    check(not quantize or h % GROUP == 0, lambda: f"quantize: H={h} is not a multiple of {GROUP}")
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    s = torch.empty((t, h), dtype=x.dtype, device=x.device) if residual is not None else y  # y: unused pointer
    if quantize:
        q = Quantized(torch.empty((t, h), dtype=torch.int8, device=x.device),
                      torch.empty((t, h // GROUP), dtype=torch.float32, device=x.device),
                      torch.empty((t, h // GROUP), dtype=torch.int32, device=x.device))
    if t > 0:
        block = max(triton.next_power_of_2(h), GROUP)  # quantize reshapes the tile into whole groups
        r = residual if residual is not None else x
        qc, qd, qs = q if quantize else (y, y, y)  # unused pointers when not quantizing
        _rms_norm_kernel[(t,)](x, r, weight, y, s, qc, qd, qs, h, x.stride(0), r.stride(0), _inv(h), float(eps),
                               BLOCK=block, RESIDUAL=residual is not None, QUANTIZE=quantize,
                               PDL=enabled(x.device), num_warps=_num_warps(block), **launch_kwargs(x.device))
    out = (y,) + ((s,) if residual is not None else ()) + ((q,) if quantize else ())
    return out[0] if len(out) == 1 else out
