"""QuantExperts against a float64 per-token, per-slot loop over the registry's decoded blocks.

Tolerance: the torch path runs in fp32 on exactly decoded weights; g, u, h and y each round in fp32 (a few
2^-24 relative of their size, products of <= 96 terms), so 1e-5 of max|ref| holds with margin; a wrong
expert, slot, format or weight moves outputs by O(max|ref|).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.quant_experts import QuantExperts
from tests.references.model import tiny

HAS_MOE_KERNEL = importlib.util.find_spec("glmtg.kernels.gguf.moe") is not None
FORMATS = {"gate_proj": "q4_0", "up_proj": "q4_0", "down_proj": "q8_0"}


def reference(x, gate, up, down, ids, weights):
    """float64 [T, H]: Σ_k w · down_e(silu(gate_e x) · up_e x), one token and slot at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        xt = x[t].double()
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            h = F.silu(gate[e] @ xt) * (up[e] @ xt)
            out[t] += float(weights[t, s]) * (down[e] @ h)
    return out


def build(blocks, formats, placement=None, backend="torch", seed=0):
    random_blocks, values = blocks
    config = tiny(hidden_size=96, moe_intermediate_size=64, n_routed_experts=5)
    gen = torch.Generator().manual_seed(seed)
    experts = QuantExperts(config, torch.float32, formats, placement=placement, backend=backend)
    full = {}
    for p, shape in (("gate_proj", (5, 64, 96)), ("up_proj", (5, 64, 96)), ("down_proj", (5, 96, 64))):
        raw = random_blocks(shape, formats[p], gen)
        full[p] = values(raw, formats[p])
        for e in range(5):
            experts.load_expert(p, e, raw[e])
    return experts, full, gen


@pytest.mark.parametrize("tokens", (1, 7))
@pytest.mark.parametrize("formats", (FORMATS, {"gate_proj": "q5_1", "up_proj": "iq4_nl", "down_proj": "q4_1"}))
def test_torch_path(blocks, formats, tokens):
    experts, full, gen = build(blocks, formats)
    x = torch.randn(tokens, 96, generator=gen)
    ids = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(tokens)])  # [T, 2], distinct per token
    weights = torch.rand(tokens, 2, generator=gen) + 0.1
    y = experts(x, ids, weights)
    ref = reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights)
    assert y.dtype == torch.float32 and y.shape == (tokens, 96)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_placement_sums_to_whole(blocks):
    """Two modules holding [0, 2) and [2, 5) add up to the whole layer; pairs held elsewhere add nothing."""
    _, full, gen = build(blocks, FORMATS, seed=1)
    x = torch.randn(6, 96, generator=gen)
    ids = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(6)])
    weights = torch.rand(6, 2, generator=gen) + 0.1
    parts = []
    for placement in ExpertPlacement.split(5, 2):
        part, _, _ = build(blocks, FORMATS, placement=placement, seed=1)
        assert part.gate_proj.shape[0] == placement.count
        parts.append(part(x, ids, weights))
    ref = reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights)
    torch.testing.assert_close((parts[0] + parts[1]).double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert not torch.equal(parts[0], torch.zeros_like(parts[0])) and not torch.equal(parts[1], parts[0])


def test_load_returns_false_elsewhere(blocks):
    config = tiny(hidden_size=96, moe_intermediate_size=64, n_routed_experts=5)
    experts = QuantExperts(config, torch.float32, FORMATS, placement=ExpertPlacement(5, 2, 5))
    raw = torch.zeros(64, 54, dtype=torch.uint8)  # q4_0 rows of 96 values: 3 blocks of 18 bytes
    assert experts.load_expert("gate_proj", 1, raw) is False
    assert experts.load_expert("gate_proj", 2, raw) is True


def test_bad_input():
    config = tiny(hidden_size=96, moe_intermediate_size=64, n_routed_experts=5)
    with pytest.raises(ValueError, match="formats must map"):
        QuantExperts(config, torch.float32, {"gate_proj": "q4_0"})
    with pytest.raises(ValueError, match="do not tile"):
        QuantExperts(config, torch.float32, {**FORMATS, "down_proj": "q4_k"})
    with pytest.raises(ValueError, match="backend"):
        QuantExperts(config, torch.float32, FORMATS, backend="cuda")
    experts = QuantExperts(config, torch.float32, FORMATS)
    with pytest.raises(ValueError, match="param must be"):
        experts.load_expert("gate", 0, torch.zeros(64, 54, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expert must be"):
        experts.load_expert("gate_proj", 5, torch.zeros(64, 54, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected shape"):
        experts.load_expert("gate_proj", 0, torch.zeros(64, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected dtype"):
        experts.load_expert("gate_proj", 0, torch.zeros(64, 54))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, from inside the Triton interpreter
@pytest.mark.skipif(not HAS_MOE_KERNEL, reason="glmtg.kernels.gguf.moe is not on this branch yet")
@pytest.mark.parametrize("dot", ("float", "auto"))
def test_kernel_backend(blocks, dot):
    """The fused decode kernels (interpreter on CPU) for few pairs: the float-decode path and the int8-dot
    path (dispatch "auto" for these formats)."""
    experts, full, gen = build(blocks, FORMATS, backend="kernel", seed=2)
    experts.dot = dot
    x = torch.randn(2, 96, generator=gen)
    ids = torch.tensor([[0, 3], [4, 1]])
    weights = torch.rand(2, 2, generator=gen) + 0.1
    ref = reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights)
    y = experts(x, ids, weights)
    # float: the kernel's sums run in a different order over fp32: 1e-4 of max|ref|. int8: x and the
    # intermediate are rounded to int8 per 32 values (relative error up to 1/254 each), so outputs move by
    # up to a few % of max|ref| (mmvq's own tests check its exact bound).
    atol = (1e-4 if dot == "float" else 3e-2) * float(ref.abs().max())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=atol)
