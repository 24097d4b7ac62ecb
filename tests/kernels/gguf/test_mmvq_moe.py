"""mmvq_moe (routed experts by int8 dot products, weights in GGUF blocks) against a float64 reference.

Reference: the formula in float64 over REGISTRY[fmt].dequantize_blocks of the same bytes, from the SAME
quantized x (quantize_activation: deterministic, the kernel's codes); a slot whose id is outside [0, E)
contributes nothing.

Tolerance, per element, from the three things the kernel does differently:
- gate/up: exact integer sums, then fp32: |Δg| <= e_g = (NB + 4) · 2^-24 · Σ|w·xq| (test_mmvq.py's bound),
  the same for u; h = silu(g)·u·w then moves by |Δh| <= w·(1.1·e_g·|u| + |silu(g)|·e_u) (|silu'| < 1.1)
  plus the fp32 roundings of silu and the products (16 · 2^-24 · |h|: compiled, exp and the division in
  the sigmoid are approximate, a few ulps each);
- the intermediate is rounded to int8 per 32 values: each h off by <= dh/2, dh = max|h| / 127 over its
  group (plus its Δh share: max|Δh| / 127);
- down: fp32 over the slots' block terms, (k · NB + 4) · 2^-24 · Σ|w·h|.
So |y - ref| <= |D| @ (dh/2 + max|Δh|/127 + |Δh|) + the fp32 term, + the output rounding. A missing silu,
weight, offset or slot is off by far more.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.mmvq import quantize_activation
from glmtg.kernels.gguf.mmvq_moe import mmvq_moe
from tests.references.gguf_weights import gguf_weight

# numpy warnings from inside the Triton interpreter: a loop bound passed as an int (__index__), and exp
# overflowing in sigmoid for large |g| (the result, 0 or 1, is right)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
NUM_EXPERTS = 4
EPS = 2.0 ** -24


def _problem(gu: str, dn: str, hidden: int, inter: int, t: int, seed: int, dtype: torch.dtype):
    gate = gguf_weight(gu, (NUM_EXPERTS, inter), hidden, seed)
    up = gguf_weight(gu, (NUM_EXPERTS, inter), hidden, seed + 1)
    down = gguf_weight(dn, (NUM_EXPERTS, hidden), inter, seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, NUM_EXPERTS, (t, 2), generator=gen)
    ids[0, 1] = -1  # out of range on both sides: these slots contribute zero
    ids[-1, 0] = NUM_EXPERTS
    weights = torch.rand(t, 2, generator=gen) + 0.5
    return x, gate, up, down, ids, weights


def _reference(x, gate, up, down, ids, weights, gu: str, dn: str,
               num_experts: int = NUM_EXPERTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, tol) in float64 (see the module docstring); x on the kernels' device (its quantization is the
    kernel's), the rest on the CPU."""
    fg, fd = REGISTRY[gu], REGISTRY[dn]
    g64, u64 = fg.dequantize_blocks(gate).double(), fg.dequantize_blocks(up).double()
    d64 = fd.dequantize_blocks(down).double()
    codes, dx, _ = quantize_activation(x)
    xq = codes.cpu().double() * dx.cpu().double().repeat_interleave(32, dim=1)
    t_count, k = ids.shape
    y = torch.zeros(x.shape, dtype=torch.float64)
    tol = torch.zeros(x.shape, dtype=torch.float64)
    nb_h, nb_i = x.shape[1] // fg.block_size, g64.shape[1] // fd.block_size
    for t in range(t_count):
        for s in range(k):
            e = int(ids[t, s])
            if not 0 <= e < num_experts:
                continue
            w = float(weights[t, s])
            g, u = g64[e] @ xq[t], u64[e] @ xq[t]
            e_g = (nb_h + 4) * EPS * (g64[e].abs() @ xq[t].abs())
            e_u = (nb_h + 4) * EPS * (u64[e].abs() @ xq[t].abs())
            silu = g * torch.sigmoid(g)
            h = silu * u * w
            dh = w * (1.1 * e_g * u.abs() + silu.abs() * e_u) + 16 * EPS * h.abs()
            step = h.abs().view(-1, 32).amax(dim=1) / 127 / 2 + dh.view(-1, 32).amax(dim=1) / 127
            y[t] += d64[e] @ h
            tol[t] += d64[e].abs() @ (step.repeat_interleave(32) + dh)
            tol[t] += (k * nb_i + 4) * EPS * (d64[e].abs() @ h.abs())
    return y, tol


def _check(gu: str, dn: str, hidden: int, inter: int, t: int, seed: int, dtype: torch.dtype = torch.float32,
           device: str = "cpu", **knobs: int) -> torch.Tensor:
    x, gate, up, down, ids, weights = _problem(gu, dn, hidden, inter, t, seed, dtype)
    ref, tol = _reference(x.to(device), gate, up, down, ids, weights, gu, dn)
    out = torch.full((t, hidden), float("nan"), dtype=dtype, device=device)
    got = mmvq_moe(*(v.to(device) for v in (x, gate, up, down, ids, weights)), gu, dn, out=out, **knobs)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    tol = tol + ROUNDOFF[dtype] * ref.abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
    return got


@pytest.mark.parametrize(("gu", "dn", "hidden", "inter"), [
    ("q4_0", "q8_0", 96, 64),
    ("q4_k", "q5_0", 256, 96),
    ("iq4_xs", "q6_k", 256, 256),
])
def test_mmvq_moe_matches_float64(gu: str, dn: str, hidden: int, inter: int) -> None:
    # 2 tokens x 2 slots, one slot id -1 and one id E; rows per program cut so that the last is ragged, and
    # steps of 2 blocks so that the loops run full steps and a partial one.
    bg, bd = REGISTRY[gu].block_size, REGISTRY[dn].block_size
    _check(gu, dn, hidden, inter, t=2, seed=11, block_i=16, block_h=64, values_per_step=2 * bg,
           values_per_step_down=2 * bd if bd < inter else bd)


def test_mmvq_moe_fused_intermediate_quantization() -> None:
    # block_i = 32: the gate/up programs quantize the intermediate themselves; I = 96: three programs.
    fused = _check("q5_0", "q4_0", 64, 96, t=2, seed=13, block_i=32, block_h=32, values_per_step=64)
    # The same fp32 intermediate, quantized by the same code in the epilogue or in its own kernel: the
    # result is bit for bit the one of the unfused path (a check far tighter than the bound above, which a
    # ~1% error in the intermediate's scales can pass).
    unfused = _check("q5_0", "q4_0", 64, 96, t=2, seed=13, block_i=16, block_h=32, values_per_step=64)
    assert torch.equal(fused, unfused)


def test_mmvq_moe_invalid_slots_give_exact_zero() -> None:
    # A token whose every slot is out of range gets exactly 0 (no NaN, no stale value).
    x, gate, up, down, ids, weights = _problem("q8_0", "q4_0", 64, 64, 2, 21, torch.float16)
    ids[1] = torch.tensor([-1, NUM_EXPERTS])
    out = torch.full((2, 64), float("nan"), dtype=torch.float16)
    mmvq_moe(x, gate, up, down, ids, weights, "q8_0", "q4_0", out=out)  # the default launch
    assert bool((out[1] == 0).all()) and bool(out[0].isfinite().all())


@pytest.mark.gpu
@pytest.mark.parametrize(("gu", "dn", "hidden", "inter"), [("q4_k", "q5_0", 512, 352), ("q6_k", "q8_0", 512, 96),
                                                            ("q4_0", "iq4_nl", 1024, 288)])
def test_mmvq_moe_bf16_on_gpu(gu: str, dn: str, hidden: int, inter: int) -> None:
    _check(gu, dn, hidden, inter, t=3, seed=31, dtype=torch.bfloat16, device="cuda")


def test_mmvq_moe_rejects_bad_input() -> None:
    x, gate, up, down, ids, weights = _problem("q8_0", "q8_0", 64, 64, 1, 41, torch.float32)
    with pytest.raises(ValueError, match="gate_up_fmt"):
        mmvq_moe(x, gate, up, down, ids, weights, "iq2_xxs", "q8_0")
    with pytest.raises(ValueError, match="down_fmt"):
        mmvq_moe(x, gate, up, down, ids, weights, "q8_0", "q9_9")
    with pytest.raises(ValueError, match="ids dtype"):
        mmvq_moe(x, gate, up, down, ids.int(), weights, "q8_0", "q8_0")
    with pytest.raises(ValueError, match="weights must"):
        mmvq_moe(x, gate, up, down, ids, weights[:, :1], "q8_0", "q8_0")
    with pytest.raises(ValueError, match="up shape"):
        mmvq_moe(x, gate, up[:2].contiguous(), down, ids, weights, "q8_0", "q8_0")
    with pytest.raises(ValueError, match="H=32"):
        mmvq_moe(x[:, :32].contiguous(), gate, up, down, ids, weights, "q8_0", "q8_0")
    with pytest.raises(ValueError, match="block_h"):
        mmvq_moe(x, gate, up, down, ids, weights, "q8_0", "q8_0", block_h=6)


@pytest.mark.parametrize(("gu", "dn", "hidden", "inter"), [("q4_0", "q8_0", 96, 64), ("q4_k", "q5_0", 256, 96)])
def test_mmvq_moe_shared_expert_is_one_more_slot(gu: str, dn: str, hidden: int, inter: int) -> None:
    # The shared expert folded in (shared=) must be exactly a slot of weight 1 on a stack that holds it as
    # expert E: the same products summed in the same order, so the two results are equal bit for bit; that
    # stacked run is checked against float64 (the bound above), so the folded one is too.
    t, e = 3, NUM_EXPERTS
    gate = gguf_weight(gu, (e + 1, inter), hidden, 51)
    up = gguf_weight(gu, (e + 1, inter), hidden, 52)
    down = gguf_weight(dn, (e + 1, hidden), inter, 53)
    gen = torch.Generator().manual_seed(54)
    x = torch.randn(t, hidden, generator=gen)
    ids = torch.randint(0, e, (t, 2), generator=gen)
    ids[1, 0] = -1  # a dropped slot still leaves the shared expert in
    weights = torch.rand(t, 2, generator=gen) + 0.5
    stacked_ids = torch.cat([ids, torch.full((t, 1), e)], dim=1)
    stacked_w = torch.cat([weights, torch.ones(t, 1)], dim=1)
    knobs = dict(block_i=16, block_h=32, values_per_step=2 * REGISTRY[gu].block_size)
    folded = mmvq_moe(x, gate[:e], up[:e], down[:e], ids, weights, gu, dn, shared=(gate[e], up[e], down[e]),
                      out=torch.full((t, hidden), float("nan")), **knobs)
    stacked = mmvq_moe(x, gate, up, down, stacked_ids, stacked_w, gu, dn, **knobs)
    assert torch.equal(folded, stacked)
    ref, tol = _reference(x, gate, up, down, stacked_ids, stacked_w, gu, dn, num_experts=e + 1)
    err = (stacked.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}"
    alone = mmvq_moe(x, gate[:e], up[:e], down[:e], ids, weights, gu, dn, **knobs)
    assert (folded - alone).abs().max() > 1e-3 * folded.abs().max()  # the shared expert did add something
    with pytest.raises(ValueError, match="shared down"):
        mmvq_moe(x, gate[:e], up[:e], down[:e], ids, weights, gu, dn, shared=(gate[e], up[e], down[e][:-1]))
