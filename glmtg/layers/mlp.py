"""SwiGLU feed-forward block: down(silu(gate x) * up x), gate and up read as one fused projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.layers.linear import DenseLinear


class MLP(nn.Module):
    """The dense layers' MLP and the MoE's shared expert. gate/up are one [2I, H] matrix (shards "gate", "up")."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = DenseLinear(hidden, (("gate", intermediate), ("up", intermediate)), bias=False, dtype=dtype)
        self.down_proj = DenseLinear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        gate, up = self.gate_up.split(self.gate_up(x))  # [..., I] each
        return self.down_proj(F.silu(gate) * up)
