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


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_cos_sin_lookup(positions: torch.Tensor, rotary_dim: int, theta: float, length: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_cos_sin(positions, ...)`` read from a table of positions [0, length) built once per (rotary_dim,
    theta, length, device): two gathers instead of ~10 small kernels every decode step. The values are the
    same (the table is rope_cos_sin of every position, element by element). Positions must lie in
    [0, length) (a cache's capacity); others are clamped into it. While a CUDA graph is being captured a missing table is not built
    (its build would be replayed every step): the direct computation runs instead."""
    key = (rotary_dim, float(theta), length, positions.device)
    table = _TABLES.get(key)
    if table is None:
        if positions.is_cuda and torch.cuda.is_current_stream_capturing():
            return rope_cos_sin(positions, rotary_dim, theta)
        if len(_TABLES) >= 4:  # a few models or capacities at once; drop the oldest
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = rope_cos_sin(torch.arange(length, device=positions.device), rotary_dim, theta)
    cos, sin = table
    # A position past the table (a full sequence whose tokens the cache write will drop) reads the last row
    # instead of faulting: nothing is checked on the host here.
    positions = positions.clamp(0, length - 1)
    return cos[positions], sin[positions]


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
