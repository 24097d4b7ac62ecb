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
