"""Partial NeoX RoPE against the transformers formula in float64."""

from __future__ import annotations

import torch

from glmtg.config import ModelConfig
from glmtg.layers.rope import apply_partial_rope, rope_cos_sin


def test_partial_rope_matches_transformers_formula():
    config = ModelConfig.preset("glm-4.5")  # rotary 64 of 128, theta 1e6
    pos = torch.tensor([[0, 1, 4095, 131071]])
    cos, sin = rope_cos_sin(pos, config.rotary_dim, config.rope_theta)
    x = torch.randn(1, 4, 2, config.head_dim, dtype=torch.float64).float()
    out = apply_partial_rope(x, cos, sin)
    r = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = pos[0, :, None].double() * inv  # [S, R/2]
    x1, x2 = x[..., : r // 2].double(), x[..., r // 2: r].double()
    c, s_ = ang.cos()[None, :, None], ang.sin()[None, :, None]
    want = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_, x[..., r:].double()], dim=-1)
    # The angle pos * inv_freq is formed in fp32 (as transformers does), so its error grows as pos * 2^-24 rad:
    # exact to 1e-6 at small positions, ~1e-3 absolute on values of size ~3 at position 4095.
    torch.testing.assert_close(out[:, :2].double(), want[:, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2:3].double(), want[:, 2:3], rtol=0, atol=2e-3)
    torch.testing.assert_close(out[..., r:], x[..., r:], rtol=0, atol=0)  # pass-through dims untouched


def test_lookup_equals_direct_computation():
    """The table gather gives rope_cos_sin's values bit for bit (same elementwise ops per position), for
    batches of positions anywhere in the table, and clamps positions past it instead of faulting."""
    from glmtg.layers.rope import rope_cos_sin_lookup

    positions = torch.tensor([[0, 1, 2], [37, 38, 39], [97, 98, 99]])
    got = rope_cos_sin_lookup(positions, 16, 10000.0, 100)
    want = rope_cos_sin(positions, 16, 10000.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    past = rope_cos_sin_lookup(torch.tensor([[99, 100, 250]]), 16, 10000.0, 100)
    last = rope_cos_sin(torch.tensor([[99]]), 16, 10000.0)
    for a, b in zip(past, last):
        assert torch.equal(a, b.expand_as(a))
