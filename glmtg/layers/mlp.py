"""SwiGLU feed-forward block: down(silu(gate x) * up x), gate and up read as one fused projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.layers import fused
from glmtg.layers.linear import DenseLinear
from glmtg.layers.quant_linear import QuantLinear


class MLP(nn.Module):
    """The dense layers' MLP and the MoE's shared expert. gate/up are one [2I, H] matrix (shards "gate", "up")."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = DenseLinear(hidden, (("gate", intermediate), ("up", intermediate)), bias=False, dtype=dtype)
        self.down_proj = DenseLinear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]; plus ``residual`` [..., H] when given (added in x's dtype, after the product)."""
        gu = self.gate_up(x)
        down = self.down_proj
        rows = gu.reshape(-1, gu.shape[-1])
        if isinstance(down, QuantLinear) and fused.fuses(gu) and down.int8_decode(rows):
            # SwiGLU and the int8 rounding of its output in one kernel; the down product reads those blocks.
            from glmtg.kernels.gguf.activation import silu_mul_quantize

            lead = gu.shape[:-1]
            blocks = silu_mul_quantize(rows)
            res = None if residual is None else residual.reshape(-1, down.out_features)
            return down.from_int8(blocks, gu.dtype, residual=res).view(*lead, down.out_features)
        gate, up = self.gate_up.split(gu)  # [..., I] each
        if isinstance(down, QuantLinear):
            return down(F.silu(gate) * up, residual=residual)
        y = down(F.silu(gate) * up)
        return y if residual is None else y + residual
