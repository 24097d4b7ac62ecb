"""mmvq's "lanes" and "lanes-wide" variants (glmtg/kernels/gguf/mmvq_lanes.py: Q6_K and Q4_K at one token)
against float64 references and against the base variant.

Bounds (as tests/kernels/gguf/test_mmvq.py; weights from tests/references/gguf_weights.py, dequantized by
gguf.quants.dequantize; x random normal):
(a) tight, from the SAME quantized activation xq = codes · dx: the integer sums are exact, what remains is
    fp32: per block a few products (<= 4 roundings of 2^-24 relative) and the fp32 sum of the block terms
    and the lanes' partial sums (<= NB + 8 roundings: at most 8 float partial sums a block, then NB blocks), so
    |y - xq @ W| <= (NB + 12) · 2^-24 · Σ_j |w_j · xq_j|; a wrong code, offset or scale is off by far more;
(b) loose, against x itself: + Σ_j |w_j| · dx_g(j) / 2 (x's rounding to int8, to nearest).
fp16 / bf16 outputs add one rounding: + 2^-11 / 2^-8 · |ref|. The base variant obeys (a) as well, so the
two variants differ by at most twice the fp32 term plus the output roundings: they differ only by the
fp32 summation order. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import gguf.quants
import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf import mmvq_lanes
from glmtg.kernels.gguf.mmvq import mmvq, quantize_activation
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _case(name: str, rows: int, blocks: int, dtype: torch.dtype, seed: int, device: str = "cpu", distinct: int = 0):
    """(raw weight on device, x [1, K] on device, w64 dequantized [distinct or rows, K], xq float64 [1, K],
    dx): ``distinct`` > 0 tiles that many random rows over ``rows`` (large GPU shapes)."""
    k = blocks * REGISTRY[name].block_size
    raw = gguf_weight(name, (distinct or rows,), k, seed=seed)
    # the gguf package's decoder (llama.cpp's reference), not glmtg's
    w64 = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), REGISTRY[name].gguf_type)).double()
    raw = raw.to(device)
    if distinct:
        raw = raw.repeat((rows + distinct - 1) // distinct, 1)[:rows].contiguous()
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    codes, dx, _ = quantize_activation(x)
    xq = codes.cpu().double() * dx.cpu().double().repeat_interleave(32, dim=1)
    return raw, x, w64, xq, dx.cpu().double()


def _check(name: str, variant: str, rows: int, blocks: int, dtype: torch.dtype, seed: int, device: str = "cpu",
           distinct: int = 0, **knobs: int) -> None:
    raw, x, w64, xq, dx = _case(name, rows, blocks, dtype, seed, device, distinct)
    out = torch.full((1, rows), float("nan"), dtype=dtype, device=device)
    got = mmvq(x, raw, name, out=out, variant=variant, **knobs)
    assert got is out
    pattern = torch.arange(rows) % w64.shape[0]  # the dequantized row each output row reads
    fp32 = ((blocks + 12) * 2.0 ** -24 * (xq.abs() @ w64.abs().T))[:, pattern]
    ref_q = (xq @ w64.T)[:, pattern]
    got64 = got.cpu().double()
    err, tol = (got64 - ref_q).abs(), fp32 + ROUNDOFF[dtype] * ref_q.abs()
    assert bool((err <= tol).all()), f"tight: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
    ref_x = (x.cpu().double() @ w64.T)[:, pattern]
    rounding = ((dx / 2).repeat_interleave(32, dim=1) @ w64.abs().T)[:, pattern]
    err = (got64 - ref_x).abs()
    assert bool((err <= tol + rounding).all()), f"loose: worst err/tol {(err / (tol + rounding)).max():.3g}"
    # the base variant on the same input: within the two fp32 terms and both output roundings
    base = mmvq(x, raw, name, variant="base").cpu().double()
    diff = (got64 - base).abs()
    assert bool((diff <= 2 * (fp32 + ROUNDOFF[dtype] * ref_q.abs())).all()), f"vs base: max {diff.max():.3g}"


VARIANTS = ("lanes", "lanes-wide")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", mmvq_lanes.LANES_FORMATS)
@pytest.mark.parametrize("blocks", [2, 3])  # 3: an odd number of blocks, so odd blocks start 2 mod 4 (q6_k)
def test_lanes_matches_float64(name: str, variant: str, blocks: int) -> None:
    # 37 rows, 8 a program: the last program ragged; the default step (2-8 blocks) ends with a partial step
    # (2 blocks over 3) or is wider than the row. (The default launch, one row a program: the other tests.)
    _check(name, variant, 37, blocks, torch.float32, seed=20 + blocks, block_n=8)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", mmvq_lanes.LANES_FORMATS)
def test_lanes_full_steps_and_knobs(name: str, variant: str) -> None:
    # 2 blocks a step over 5: two full (unmasked) steps and a partial one; 4 rows a program (the last ragged)
    # on two warps; fp16 in and out. Rows of 5 q6_k blocks are 1050 bytes: every other row starts 2 mod 4.
    _check(name, variant, 9, 5, torch.float16, seed=5, block_n=4, values_per_step=512, num_warps=2)
    _check(name, variant, 9, 5, torch.float16, seed=6, block_n=2, values_per_step=2048)  # wider than a row
    # one block asked a step: q6_k takes 2 (each block slot keeps its alignment), q4_k one
    _check(name, variant, 5, 3, torch.float16, seed=7, values_per_step=256)


def test_lanes_epilogue_and_fallbacks() -> None:
    raw = gguf_weight("q6_k", (11,), 768, seed=8)
    x = torch.randn(1, 768, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    y = mmvq(x, raw, "q6_k", variant="lanes")
    bias = torch.randn(11, generator=torch.Generator().manual_seed(10)).to(torch.float16)
    res = torch.randn(1, 11, generator=torch.Generator().manual_seed(11)).to(torch.float16)
    # bias and residual with torch's unfused roundings, bit for bit; residual may be out itself
    want = ((y.float() + bias.float()).half().float() + res.float()).half()
    assert torch.equal(mmvq(x, raw, "q6_k", bias=bias, residual=res, variant="lanes"), want)
    out = res.clone()
    mmvq(x, raw, "q6_k", out=out, bias=bias, residual=out, variant="lanes")
    assert torch.equal(out, want)
    # several tokens, or a format the lanes kernel does not read: the base kernel, bit for bit
    x3 = torch.randn(3, 768, generator=torch.Generator().manual_seed(12))
    assert torch.equal(mmvq(x3, raw, "q6_k", variant="lanes"), mmvq(x3, raw, "q6_k", variant="base"))
    raw5 = gguf_weight("q5_k", (11,), 768, seed=13)
    assert torch.equal(mmvq(x, raw5, "q5_k", variant="lanes"), mmvq(x, raw5, "q5_k", variant="base"))
    # the process-wide switch (GLMTG_MMVQ_VARIANT) picks the same kernel as the argument
    with mmvq_lanes.variant_mode("base"):
        assert torch.equal(mmvq(x, raw, "q6_k"), mmvq(x, raw, "q6_k", variant="base"))
    assert mmvq_lanes.current_variant() == "lanes"  # the default (DECISIONS H8), restored after the block
    assert torch.equal(mmvq(x, raw, "q6_k"), y)


def test_lanes_rejects_unknown_variant() -> None:
    raw = gguf_weight("q6_k", (3,), 256, seed=1)
    with pytest.raises(ValueError, match="variant"):
        mmvq(torch.randn(1, 256), raw, "q6_k", variant="coalesced")
    with pytest.raises(ValueError, match="GLMTG_MMVQ_VARIANT"):
        mmvq_lanes.set_variant("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,rows,blocks", [("q6_k", 151552, 16), ("q6_k", 4096, 48), ("q6_k", 4096, 16),
                                              ("q4_k", 12288, 16), ("q4_k", 4096, 48), ("q4_k", 1024, 16)])
def test_lanes_bf16_air_shapes_on_gpu(name: str, rows: int, blocks: int, variant: str) -> None:
    # The compiled kernel (dp4a, shf.r.clamp) at GLM-4.5-Air's shapes: the output head, o_proj (K = 12288),
    # q_proj and k/v; 256 random rows tiled over the rows (a float64 reference of every row would not fit).
    _check(name, variant, rows, blocks, torch.bfloat16, seed=rows + blocks, device="cuda", distinct=256)
