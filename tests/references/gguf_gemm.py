"""float64 references and error bounds for the dequantizing GEMMs (glmtg/kernels/gguf/mmq.py, mmq_moe.py).

Weights are dequantized by ``gguf.quants.dequantize`` itself (the format's definition), then widened to
float64; products and sums are float64.

Error bound of one kernel dot product y = Σ_k x_k w_k over K terms, rounded to the output dtype:
- the kernel rounds each decoded weight (exact fp32) to the dot dtype: relative 2^-11 (fp16), 2^-8 (bf16),
  0 (fp32, exact); below fp16's normal range (|w| < 2^-14) an absolute 2^-25 instead;
- products of fp16/bf16 operands are exact in fp32, fp32 x fp32 products round by 2^-24; K - 1 fp32 sums
  in any order: together at most (K + 1) · 2^-24 · Σ|x||w|;
- the result is rounded once to the output dtype: + u_out · |y|.
So  |y - ref| <= (u_w + (K + 1) 2^-24) · Σ|x||w| · (1 + u_out) + 2^-25 · Σ|x| + u_out · |ref|,
with Σ|x||w| a sum of magnitudes (the bound holds where terms cancel). A wrong block (any decoder or
addressing slip) is off by the order of |w| · |x| and fails it.
"""

from __future__ import annotations

import gguf
import gguf.quants
import torch

from glmtg.formats import REGISTRY

UNIT = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def dequant64(raw: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [..., row_bytes] of GGUF format ``name`` -> float64 [..., values], by gguf.quants.dequantize."""
    qtype = gguf.GGMLQuantizationType(REGISTRY[name].gguf_type)
    values = gguf.quants.dequantize(raw.cpu().numpy(), qtype)
    return torch.from_numpy(values.copy()).double()


def dot_tolerance(x64: torch.Tensor, w64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bound above for x [M, K] @ w [N, K]ᵀ computed in ``dtype`` (float64 [M, N]); ref excluded."""
    k = x64.shape[-1]
    u = UNIT[dtype]
    mags = x64.abs() @ w64.abs().T
    return (u + (k + 1) * 2.0 ** -24) * mags * (1 + u) + 2.0 ** -25 * x64.abs().sum(-1, keepdim=True)


def moe_reference(x: torch.Tensor, gate64: torch.Tensor, up64: torch.Tensor, down64: torch.Tensor,
                  ids: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref, tol) float64 [T, H] of Σ_s weights[t, s] · down_e(silu(gate_e x_t) · up_e x_t) over the slots s
    whose expert e is in [0, E), and a bound on a kernel's error that computes it in ``dtype`` as
    glmtg/kernels/gguf/mmq_moe.py does. Per pair, propagating each step's bound (``dot_tolerance``) through
    the next (|d silu(g) / dg| <= 1.1):
      act:  e_a = 1.1 |u| tol_g + (|silu g| + 1.1 tol_g) tol_u, then + (2^-21 + u_out)(|act| + e_a) for
            the fp32 silu / product (a few ulps) and act's rounding to ``dtype``;
      y:    e_y = |D| (e_a) + tol(|act| + e_a, D) + u_out (|y| + ...) (y rounded to ``dtype``);
      out:  Σ_s |w_s| e_y,s + (k + 1) 2^-24 Σ_s |w_s y_s| + u_out |ref| (fp32 sum, one rounding)."""
    u = UNIT[dtype]
    xs = x.double()
    t, k = ids.shape
    ref = torch.zeros(t, down64.shape[1], dtype=torch.float64)
    tol = torch.zeros_like(ref)
    mags = torch.zeros_like(ref)
    for e in range(gate64.shape[0]):  # all pairs of one expert at once
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xr = xs[tok]
        g, up_ = xr @ gate64[e].T, xr @ up64[e].T
        tol_g, tol_u = dot_tolerance(xr, gate64[e], dtype), dot_tolerance(xr, up64[e], dtype)
        silu = g * torch.sigmoid(g)
        act = silu * up_
        e_a = 1.1 * up_.abs() * tol_g + (silu.abs() + 1.1 * tol_g) * tol_u
        e_a = e_a + (2.0 ** -21 + u) * (act.abs() + e_a)
        y = act @ down64[e].T
        e_y = e_a @ down64[e].abs().T + dot_tolerance(act.abs() + e_a, down64[e], dtype)
        e_y = e_y + u * (y.abs() + e_y)
        w = weights[tok, slot].double()[:, None]
        ref.index_add_(0, tok, w * y)
        tol.index_add_(0, tok, w.abs() * e_y)
        mags.index_add_(0, tok, w.abs() * y.abs())
    return ref, tol + (k + 1) * 2.0 ** -24 * mags + u * ref.abs()
