"""Partial rotary position embedding in the NeoX layout (GLM4-MoE rotates the first half of each head)."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> fp32 cos, sin [B, S, rotary_dim] in NeoX layout (each frequency twice, halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]
    return emb.cos(), emb.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; rotate the first R = cos.shape[-1] dims (rotate_half over those R), pass the rest.

    Done in fp32 whatever the model dtype: positions up to 200k need the precision in the angle products.
    """
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, S, 1, R] broadcast over heads
    rot = x[..., :r].float()
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1)
