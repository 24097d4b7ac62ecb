"""mmvq (x @ W.T by int8 dot products, W in GGUF blocks) and quantize_activation against float64 references.

Two references per case (weights: tests/references/gguf_weights.py, finite; x random normal):

(a) tight, from the SAME quantized activation: xq = codes · dx (float64) @ dequant(W) (float64). Given the
    codes, the kernel's integer sums are exact; what remains is fp32: per block a few products (scale
    times scale times an exact integer below 2^24: <= 4 roundings of 2^-24 relative) and the fp32 sum of
    NB block terms (<= NB roundings), so |y - ref| <= (NB + 4) · 2^-24 · Σ_j |w_j · xq_j| (a sum of
    magnitudes: holds under cancellation). A wrong code, offset or scale is off by far more.
(b) loose, against x itself: each x_j is off by at most dx_g / 2 (round to nearest), so
    |y - dequant(W) @ x| <= Σ_j |w_j| · dx_g(j) / 2 + the fp32 term of (a).

fp16 / bf16 outputs add one rounding: + 2^-11 / 2^-8 · |ref|. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS
from glmtg.kernels.gguf.mmvq import MMVQ_FORMATS, mmvq, quantize_activation
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _quantized_x(codes: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """codes · dx in float64, [T, K]."""
    return codes.double() * dx.double().repeat_interleave(32, dim=1)


def _check(name: str, t: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu", blocks: int = 3,
           **knobs: int) -> None:
    f = REGISTRY[name]
    k = blocks * f.block_size
    raw = gguf_weight(name, (n,), k, seed=seed)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    w64 = f.dequantize_blocks(raw).double()
    codes, dx, _ = quantize_activation(x.to(device))
    xq = _quantized_x(codes.cpu(), dx.cpu())
    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
    got = mmvq(x.to(device), raw.to(device), name, out=out, **knobs)
    assert got is out
    got = got.cpu().double()
    fp32 = (k // f.block_size + 4) * 2.0 ** -24 * (xq.abs() @ w64.abs().T)
    ref_q = xq @ w64.T
    err = (got - ref_q).abs()
    tol = fp32 + ROUNDOFF[dtype] * ref_q.abs()
    assert bool((err <= tol).all()), f"tight: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
    ref_x = x.double() @ w64.T
    rounding = (dx.cpu().double() / 2).repeat_interleave(32, dim=1) @ w64.abs().T
    err = (got - ref_x).abs()
    tol = rounding + fp32 + ROUNDOFF[dtype] * ref_q.abs()
    assert bool((err <= tol).all()), f"loose: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


def test_quantize_activation() -> None:
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    x[1, 32:64] = 0.0  # an all-zero group: dx 0, codes 0
    codes, dx, sums = quantize_activation(x)
    assert codes.dtype == torch.int8 and dx.dtype == torch.float32 and sums.dtype == torch.int32
    amax = x.view(3, 3, 32).abs().amax(dim=2)
    assert torch.equal(dx, amax / 127)
    assert torch.equal(sums, codes.view(3, 3, 32).int().sum(dim=2))
    assert bool((codes.abs() <= 127).all()) and int(codes[1, 32:64].abs().sum()) == 0
    scaled = x.double().view(3, 3, 32) * (127 / amax.double()).nan_to_num(posinf=0.0)[:, :, None]
    # rounded to nearest: within half a code (+ the fp32 rounding of x · (127 / amax))
    assert bool(((codes.view(3, 3, 32).double() - scaled).abs() <= 0.5 + 1e-4).all())
    # every group's largest |x| maps to ±127
    assert bool((codes.view(3, 3, 32).abs().amax(dim=2)[amax > 0] == 127).all())


@pytest.mark.parametrize("name", MMVQ_FORMATS)
@pytest.mark.parametrize("t", [1, 3])
def test_mmvq_matches_float64(name: str, t: int) -> None:
    # 16 rows a program: 3 programs, the last ragged; 3 blocks: one partial step at the default step.
    _check(name, t, n=37, dtype=torch.float32, seed=t * 10 + REGISTRY[name].gguf_type, block_n=16)


@pytest.mark.parametrize("name", MMVQ_FORMATS)
def test_mmvq_full_steps_and_knobs(name: str) -> None:
    # Steps of 2 blocks over 5: two full (unmasked) steps and a partial one; fp16 in and out.
    bs = REGISTRY[name].block_size
    _check(name, 1, n=9, dtype=torch.float16, seed=5, blocks=5, block_n=4, values_per_step=2 * bs)
    _check(name, 3, n=9, dtype=torch.float16, seed=6, blocks=5, block_n=4, values_per_step=2 * bs, num_warps=2)


def test_mmvq_default_launch() -> None:
    _check("q4_0", 2, n=19, dtype=torch.float32, seed=7)


def test_mmvq_takes_a_quantized_activation() -> None:
    # x quantized once, passed in: the same result bit for bit as quantizing inside.
    raw = gguf_weight("q4_k", (7,), 512, seed=8)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(9))
    want = mmvq(x, raw, "q4_k")
    got = mmvq(x, raw, "q4_k", quantized=quantize_activation(x))
    assert torch.equal(got, want)
    codes, dx, sums = quantize_activation(x)
    with pytest.raises(ValueError, match="quantized"):
        mmvq(x, raw, "q4_k", quantized=(codes, dx))
    with pytest.raises(ValueError, match="quantized"):
        mmvq(x, raw, "q4_k", quantized=(codes, dx.double(), sums))


@pytest.mark.gpu
@pytest.mark.parametrize("name", MMVQ_FORMATS)
@pytest.mark.parametrize("t", [1, 3, 16])
def test_mmvq_bf16_on_gpu(name: str, t: int) -> None:
    # The compiled kernels (dp4a and the other inline PTX run only there); larger K: full steps.
    _check(name, t, n=37, dtype=torch.bfloat16, seed=60 + t, device="cuda", blocks=40)


def test_mmvq_rejects_bad_input() -> None:
    raw = gguf_weight("q8_0", (5,), 64, seed=1)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="fmt"):
        mmvq(x, raw, "q9_9")
    with pytest.raises(ValueError, match="fmt: no int8-dot path"):
        mmvq(x, raw, "iq2_xxs")
    with pytest.raises(ValueError, match="x dtype"):
        mmvq(x.to(torch.int32), raw, "q8_0")
    with pytest.raises(ValueError, match="weight must be"):
        mmvq(x, raw.view(torch.int8), "q8_0")
    with pytest.raises(ValueError, match="K=32"):
        mmvq(x[:, :32], raw, "q8_0")
    with pytest.raises(ValueError, match="tokens"):
        mmvq(torch.randn(GEMV_MAX_TOKENS + 1, 64), raw, "q8_0")
    with pytest.raises(ValueError, match="out"):
        mmvq(x, raw, "q8_0", out=torch.empty(1, 4))
    with pytest.raises(ValueError, match="block_n"):
        mmvq(x, raw, "q8_0", block_n=3)
    with pytest.raises(ValueError, match="x: K=48"):
        quantize_activation(torch.randn(2, 48))
    with pytest.raises(ValueError, match="x must be"):
        quantize_activation(torch.randn(2, 4, 32))
