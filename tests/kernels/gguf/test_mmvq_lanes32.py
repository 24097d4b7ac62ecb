"""mmvq's "lanes-q4" variants (glmtg/kernels/gguf/mmvq_lanes32.py: Q4_0, Q5_0, Q8_0 at one token, L = 2, 1, 4
lanes a block) against float64 and against the base kernel.

Bounds, as tests/kernels/gguf/test_mmvq_lanes.py (weights: tests/references/gguf_weights.py, dequantized by
gguf.quants.dequantize; x random normal):
(a) tight, from the SAME quantized activation xq = codes · dx: each block's Σ q·xq is an exact int32 (the
    lanes' partial dots are summed as integers before any scale), then a block's term takes <= 3 fp32
    roundings and the NB terms an fp32 sum: |y - xq @ W| <= (NB + 12) · 2^-24 · Σ_j |w_j · xq_j|;
(b) loose, against x itself: + Σ_j |w_j| · dx_g(j) / 2 (x's rounding to int8, to nearest).
Bit-equality with the base kernel at the same launch (rows a program, blocks a step): each block's fp32
term is the same product in the same order (words.block_dot's), and the terms are accumulated per block
slot over the steps and summed in the same order: equal in the interpreter (numpy sums the same arrays). On
a GPU the reduction trees of the two layouts may differ, so the GPU test uses bound (a) twice instead.
Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import gguf.quants
import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf import mmvq_lanes32
from glmtg.kernels.gguf.mmvq import mmvq, quantize_activation
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
VARIANTS = tuple(mmvq_lanes32.LANES32_VARIANTS)


def _check(name: str, variant: str, rows: int, blocks: int, dtype: torch.dtype, seed: int, device: str = "cpu",
           distinct: int = 0, **knobs: int) -> torch.Tensor:
    k = blocks * 32
    raw = gguf_weight(name, (distinct or rows,), k, seed=seed)
    w64 = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), REGISTRY[name].gguf_type)).double()
    raw = raw.to(device)
    if distinct:  # large GPU shapes: that many random rows tiled over the rows
        raw = raw.repeat((rows + distinct - 1) // distinct, 1)[:rows].contiguous()
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    codes, dx, _ = quantize_activation(x)
    xq = codes.cpu().double() * dx.cpu().double().repeat_interleave(32, dim=1)
    out = torch.full((1, rows), float("nan"), dtype=dtype, device=device)
    got = mmvq(x, raw, name, out=out, variant=variant, **knobs)
    assert got is out
    pattern = torch.arange(rows) % w64.shape[0]
    ref_q = (xq @ w64.T)[:, pattern]
    tol = ((blocks + 12) * 2.0 ** -24 * (xq.abs() @ w64.abs().T))[:, pattern] + ROUNDOFF[dtype] * ref_q.abs()
    got64 = got.cpu().double()
    err = (got64 - ref_q).abs()
    assert bool((err <= tol).all()), f"tight: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
    rounding = ((dx.cpu().double() / 2).repeat_interleave(32, dim=1) @ w64.abs().T)[:, pattern]
    err = (got64 - (x.cpu().double() @ w64.T)[:, pattern]).abs()
    assert bool((err <= tol + rounding).all()), f"loose: worst err/tol {(err / (tol + rounding)).max():.3g}"
    if device != "cpu":  # the base kernel's own launch: within the two fp32 bounds
        diff = (got64 - mmvq(x, raw, name, variant="base").cpu().double()).abs()
        assert bool((diff <= 2 * tol).all()), f"vs base: max {diff.max():.3g}"
    return got


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", mmvq_lanes32.LANES32_FORMATS)
def test_lanes32_matches_float64_and_base(name: str, variant: str) -> None:
    # 7 rows, 2 a program (the last ragged: row 7 reads row 6, not stored); 6 blocks in steps of 4: one full
    # (unmasked) step, then a partial one of 2. Rows of 6 blocks: odd blocks start 2 mod 4 (q4_0, q5_0: 18 and
    # 22 bytes), so both funnel shifts (0 and 16 bits) occur.
    knobs = dict(block_n=2, values_per_step=128, num_warps=1)
    got = _check(name, variant, 7, 6, torch.float32, seed=3, **knobs)
    # the same input as _check's (seeds 3, 4): the base kernel at the same launch, bit for bit
    raw = gguf_weight(name, (7,), 192, seed=3)
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, mmvq(x, raw, name, variant="base", **knobs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_lanes32_default_launch_fp16(variant: str) -> None:
    # The default launch (2 rows x 4096 values: the whole row in one partial step), fp16 in and out.
    _check("q4_0", variant, 5, 4, torch.float16, seed=9)


def test_lanes32_epilogue_selection_and_fallbacks() -> None:
    raw = gguf_weight("q4_0", (11,), 128, seed=8)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    y = mmvq(x, raw, "q4_0", variant="lanes-q4")
    bias = torch.randn(11, generator=torch.Generator().manual_seed(10)).to(torch.float16)
    res = torch.randn(1, 11, generator=torch.Generator().manual_seed(11)).to(torch.float16)
    # bias and residual with torch's unfused roundings, bit for bit; residual may be out itself
    want = ((y.float() + bias.float()).half().float() + res.float()).half()
    out = res.clone()
    mmvq(x, raw, "q4_0", out=out, bias=bias, residual=out, variant="lanes-q4")
    assert torch.equal(out, want)
    # which kernel: one token, an even number of blocks a row, a 32-value format of the module
    assert mmvq_lanes32.lanes32_split("lanes-q4", "q4_0", 1, 4) == 2
    assert mmvq_lanes32.lanes32_split("lanes-q4-wide", "q8_0", 1, 4) == 4
    assert mmvq_lanes32.lanes32_split("lanes-q4-auto", "q4_0", 1, 4) == 1
    assert mmvq_lanes32.lanes32_split("lanes-q4-auto", "q8_0", 1, 4) == 2
    assert mmvq_lanes32.lanes32_split("lanes-q4", "q4_0", 1, 3) == 0  # rows not 4-byte aligned
    assert mmvq_lanes32.lanes32_split("lanes-q4", "q4_0", 2, 4) == 0
    assert mmvq_lanes32.lanes32_split("lanes", "q4_0", 1, 4) == 0
    assert mmvq_lanes32.lanes32_split("lanes-q4", "iq4_nl", 1, 4) == 0
    # the fallbacks run the base kernel: bit for bit
    raw3 = gguf_weight("q4_0", (5,), 96, seed=12)
    x3 = torch.randn(1, 96, generator=torch.Generator().manual_seed(13))
    assert torch.equal(mmvq(x3, raw3, "q4_0", variant="lanes-q4"), mmvq(x3, raw3, "q4_0", variant="base"))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,rows,blocks", [("q4_0", 12288, 128), ("q4_0", 4096, 384), ("q4_0", 1024, 128),
                                              ("q4_0", 151552, 128), ("q8_0", 12288, 128), ("q5_0", 4096, 342)])
def test_lanes32_bf16_air_shapes_on_gpu(name: str, rows: int, blocks: int, variant: str) -> None:
    # The compiled kernel (dp4a, shf.r.clamp) at GLM-4.5-Air's shapes: q_proj, o_proj (K = 12288), k/v, the
    # output head, the dense down (K = 10944, q5_0); 256 random rows tiled over the rows.
    _check(name, variant, rows, blocks, torch.bfloat16, seed=rows + blocks, device="cuda", distinct=256)
