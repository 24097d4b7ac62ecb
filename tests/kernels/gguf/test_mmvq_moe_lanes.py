"""mmvq_moe's lanes variants (glmtg/kernels/gguf/mmvq_moe_lanes.py: routed experts at one token, the blocks
read by neighbouring lanes) against float64 and against the base kernels.

Reference: the formula in float64 over the gguf package's dequantization of the same bytes, from the SAME
quantized x (the kernel's codes), the shared expert as one more slot of weight 1; a slot whose id is outside
[0, E) contributes nothing; a repeated expert counts twice.
Tolerance per output (as tests/kernels/gguf/test_mmvq_moe.py, whose derivation this follows):
- gate/up: exact int32 block sums, then fp32: |Δg| <= e_g = (NB + 4) · 2^-24 · Σ|w·xq|, the same for u;
  h = silu(g)·u·w moves by <= w·(1.1·e_g·|u| + |silu(g)|·e_u) + 16 · 2^-24 · |h| (compiled exp and division);
- the intermediate is rounded to int8 per 32 values: <= dh/2 a value (dh = max|h| / 127 of its group), plus
  its share of the Δh above (max|Δh| / 127);
- down: fp32 over the slots' block terms, (k · NB + 4) · 2^-24 · Σ|w·h|; then x's dtype.
Against the base kernels at the same launch knobs (rows a program, blocks a step: the lanes kernels read
them the same way) the results are equal bit for bit in the interpreter: every block's fp32 term is
words.block_dot's, accumulated per block slot over the same steps and slots and summed in the same order.
Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import gguf.quants
import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf import mmvq_moe_lanes
from glmtg.kernels.gguf.mmvq import quantize_activation
from glmtg.kernels.gguf.mmvq_moe import mmvq_moe
from tests.references.gguf_weights import gguf_weight

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
EPS = 2.0 ** -24
LANES = ("lanes", "lanes-narrow", "lanes-wide")
E = 4  # routed experts; the stacks hold one more, the shared expert


def _deq(raw: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw.cpu().numpy(), REGISTRY[name].gguf_type)).double()


def _problem(gu: str, dn: str, hidden: int, inter: int, seed: int, dtype: torch.dtype, device: str = "cpu",
             experts: int = E, distinct: int = 0):
    """Stacks of experts + 1 (the last: the shared expert), x [1, H], ids [1, 5] with a repeated expert and
    both kinds of out-of-range id, weights. ``distinct``: rows drawn at random, tiled (large GPU shapes)."""
    def stack(name, rows, k, s):
        raw = gguf_weight(name, (experts + 1, distinct or rows), k, s)
        if distinct:
            raw = raw.repeat(1, (rows + distinct - 1) // distinct, 1)[:, :rows].contiguous()
        return raw.to(device)
    gate, up, down = stack(gu, inter, hidden, seed), stack(gu, inter, hidden, seed + 1), stack(dn, hidden, inter,
                                                                                               seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(1, hidden, generator=gen) * (2.0 ** -6 if dtype == torch.float16 else 1.0)  # fp16: y < 65504
    x = x.to(dtype).to(device)
    ids = torch.tensor([[2, 2, -1, 1, experts]], device=device)  # expert 2 twice, -1 and E dropped
    weights = (torch.rand(1, 5, generator=gen) + 0.5).to(device)
    return x, gate, up, down, ids, weights


def _reference(x, gate, up, down, ids, weights, gu: str, dn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, tol) in float64 (module docstring), the shared expert (the stacks' last) as a slot of weight 1."""
    experts = gate.shape[0] - 1
    g64, u64, d64 = _deq(gate, gu), _deq(up, gu), _deq(down, dn)
    codes, dx, _ = quantize_activation(x)
    xq = codes.cpu().double()[0] * dx.cpu().double()[0].repeat_interleave(32)
    slots = [(int(e), float(w)) for e, w in zip(ids[0].tolist(), weights[0].tolist()) if 0 <= e < experts]
    slots.append((experts, 1.0))  # the shared expert
    k = ids.shape[1] + 1  # slots the kernel sums, valid or not
    nb_h, nb_i = x.shape[1] // REGISTRY[gu].block_size, g64.shape[1] // REGISTRY[dn].block_size
    y = torch.zeros(x.shape[1], dtype=torch.float64)
    tol = torch.zeros(x.shape[1], dtype=torch.float64)
    for e, w in slots:
        g, u = g64[e] @ xq, u64[e] @ xq
        e_g = (nb_h + 4) * EPS * (g64[e].abs() @ xq.abs())
        e_u = (nb_h + 4) * EPS * (u64[e].abs() @ xq.abs())
        silu = g * torch.sigmoid(g)
        h = silu * u * w
        dh = w * (1.1 * e_g * u.abs() + silu.abs() * e_u) + 16 * EPS * h.abs()
        step = h.abs().view(-1, 32).amax(dim=1) / 127 / 2 + dh.view(-1, 32).amax(dim=1) / 127
        y += d64[e] @ h
        tol += d64[e].abs() @ (step.repeat_interleave(32) + dh)
        tol += (k * nb_i + 4) * EPS * (d64[e].abs() @ h.abs())
    return y[None], tol[None]


def _run(variant: str, x, gate, up, down, ids, weights, gu: str, dn: str, **knobs) -> torch.Tensor:
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    got = mmvq_moe(x, gate[:-1], up[:-1], down[:-1], ids, weights, gu, dn, out=out, variant=variant,
                   shared=(gate[-1], up[-1], down[-1]), **knobs)
    assert got is out
    return got


def _check(variant: str, gu: str, dn: str, hidden: int, inter: int, seed: int, dtype: torch.dtype,
           device: str = "cpu", distinct: int = 0, **knobs) -> tuple[torch.Tensor, tuple]:
    problem = _problem(gu, dn, hidden, inter, seed, dtype, device, distinct=distinct)
    got = _run(variant, *problem, gu, dn, **knobs)
    ref, tol = _reference(*problem, gu, dn)
    tol = tol + ROUNDOFF[dtype] * ref.abs()
    err = (got.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
    return got, problem


# The Air mixes' expert formats (glmtg.formats.mix): Q4_0 everywhere; Q4_K_M q4_k gate/up, q5_0 or q8_0 down;
# q4_k down as GLM-4.5's (I = 1536). Every lane count on q4_0; the other formats spread over the variants
# (test_mmvq_lanes32.py covers every format x lane count of the shared block reader; interpreter time).
@pytest.mark.parametrize(("variant", "gu", "dn", "hidden", "inter"), [
    ("lanes", "q4_0", "q4_0", 192, 64), ("lanes-narrow", "q4_0", "q4_0", 192, 64),
    ("lanes-wide", "q4_0", "q4_0", 64, 192), ("lanes", "q4_k", "q5_0", 256, 64),
    ("lanes-wide", "q4_k", "q8_0", 256, 64),
    ("lanes-narrow", "q4_0", "q8_0", 64, 192), ("lanes", "q4_0", "q4_k", 64, 256)])
def test_lanes_match_float64_and_base(variant: str, gu: str, dn: str, hidden: int, inter: int) -> None:
    # Knobs given: 64 rows a gate/up program, 32 a down program (the last ragged where a dimension is 192),
    # 4 blocks a step: rows of 6 blocks take a full (unmasked) step and a partial one, of 1-2 blocks a
    # partial one alone, of 4 a full one alone. (The base gate/up then rounds the intermediate in its
    # epilogue: bit for bit its unfused rounding, test_mmvq_moe.py.)
    bg, bd = REGISTRY[gu].block_size, REGISTRY[dn].block_size
    knobs = dict(block_i=64, values_per_step=4 * bg, block_h=32, values_per_step_down=4 * bd, num_warps=1)
    got, problem = _check(variant, gu, dn, hidden, inter, 7, torch.float32, **knobs)
    assert torch.equal(got, _run("base", *problem, gu, dn, **knobs))


def test_lanes_default_launch_fp16() -> None:
    # The default launch (mmvq_moe_lanes.default_config: one row a gate/up program, down steps dividing the
    # row), fp16 in and out.
    _check("lanes", "q4_0", "q5_0", 64, 64, 11, torch.float16)


def test_lanes_selection() -> None:
    assert mmvq_moe_lanes.lanes_for("lanes", "q4_0", 128, 1) == 2
    assert mmvq_moe_lanes.lanes_for("lanes-narrow", "q8_0", 44, 1) == 1
    assert mmvq_moe_lanes.lanes_for("lanes-wide", "q4_k", 16, 1) == 2  # Q4_K: E (8 lanes a block)
    assert mmvq_moe_lanes.lanes_for("lanes-auto", "q4_0", 44, 1) == 1
    assert mmvq_moe_lanes.lanes_for("lanes-auto", "q8_0", 44, 1) == 2
    assert mmvq_moe_lanes.lanes_for("lanes-auto", "q4_k", 16, 1) == 1
    assert mmvq_moe_lanes.lanes_for("lanes", "q4_0", 3, 1) == 0  # odd rows: not 4-byte aligned
    assert mmvq_moe_lanes.lanes_for("lanes", "q4_0", 128, 2) == 0  # several tokens: the base kernels
    assert mmvq_moe_lanes.lanes_for("lanes", "q6_k", 16, 1) == 0
    assert mmvq_moe_lanes.lanes_for("base", "q4_0", 128, 1) == 0
    assert mmvq_moe_lanes.lanes_for(None, "q4_0", 128, 1) == 0  # the default: base
    with mmvq_moe_lanes.variant_mode("lanes"):
        assert mmvq_moe_lanes.lanes_for(None, "q4_0", 128, 1) == 2
    with pytest.raises(ValueError, match="variant"):
        mmvq_moe_lanes.lanes_for("fast", "q4_0", 128, 1)
    with pytest.raises(ValueError, match="GLMTG_MMVQ_MOE_VARIANT"):
        mmvq_moe_lanes.set_variant("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", LANES + ("lanes-auto",))
@pytest.mark.parametrize(("gu", "dn"), [("q4_0", "q4_0"), ("q4_k", "q5_0"), ("q4_k", "q8_0")])
def test_lanes_bf16_air_shapes_on_gpu(variant: str, gu: str, dn: str) -> None:
    # GLM-4.5-Air's expert shapes (H 4096, I 1408), the compiled kernels (dp4a, shf.r.clamp), 8 distinct
    # random rows tiled; against float64 and within that bound of the base kernels' default launch.
    got, problem = _check(variant, gu, dn, 4096, 1408, 21, torch.bfloat16, device="cuda", distinct=8)
    base = _run("base", *problem, gu, dn)
    ref, tol = _reference(*problem, gu, dn)
    diff = (got.cpu().double() - base.cpu().double()).abs()
    assert bool((diff <= 2 * (tol + ROUNDOFF[torch.bfloat16] * ref.abs())).all()), f"vs base: {diff.max():.3g}"
