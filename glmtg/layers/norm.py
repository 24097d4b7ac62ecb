"""RMSNorm as transformers computes it (normalise in fp32, round back, then scale), with the residual add
that precedes every norm of a decoder folded in."""

from __future__ import annotations

import torch
from torch import nn

from glmtg.layers import fused


class RMSNorm(nn.Module):
    """y = weight * round(x / rms(x)), the normalisation done in fp32 whatever x's dtype.

    ``quantize_output``: set by the model when the layer after this norm reads int8 activations (GGUF
    weights on the mmvq path); the fused kernel then rounds y to int8 blocks in the same launch and leaves
    them where the next projection looks (glmtg.kernels.gguf.activation.remember).
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.quantize_output = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with ``residual``: s = x + residual (rounded to x's dtype), returns (norm(s), s)."""
        if fused.fuses(x) and x.dtype == self.weight.dtype:
            return self._fused(x, residual)
        if residual is not None:
            x = x + residual
        # Round back to x's dtype before the weight, as transformers does: bit-compatible in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(x.dtype)
        return y if residual is None else (y, x)

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        from glmtg.kernels.rms_norm import rms_norm

        shape = x.shape
        quantize = self.quantize_output and shape[-1] % 32 == 0
        flat = x.reshape(-1, shape[-1])
        res = None if residual is None else residual.reshape(-1, shape[-1])
        got = rms_norm(flat, self.weight, self.eps, residual=res, quantize=quantize)
        got = got if isinstance(got, tuple) else (got,)
        y = got[0].view(shape)
        if quantize:
            from glmtg.kernels.gguf.activation import remember

            remember(got[0], got[-1])
        return y if residual is None else (y, got[1].view(shape))
