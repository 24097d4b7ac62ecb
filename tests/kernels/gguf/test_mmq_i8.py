"""mmq_i8 (int8 tensor-core dots over q4_0 / q8_0 blocks for a decode batch) against float64.

Reference: x's own int8 blocks (activation.quantize_activation: codes, dx) widened to float64, @ gguf's
dequantization of the weight in float64. The integer dot of a block is exact in the kernel (|Σ| < 2^24), so
its error is the fp32 scaling (dx · d, then · dot: two roundings of 2^-24 a term) and the fp32 sum over the
NB blocks ((NB + 2) 2^-24 Σ|terms| in all), then the output rounding u_out |ref|; the pieces of a split only
reorder that sum. Against the exact x the bound adds the int8 rounding of x: dx/2 a value, Σ_b dx_b/2 Σ|w|.
Outputs poisoned with NaN. Odd shapes: T = 3, 5, 17, N = 37, K = 7 blocks cut into pieces of 3, 3, 1.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.gguf.activation import quantize_activation
from glmtg.kernels.gguf.mmq_i8 import I8_FORMATS, mmq_i8
from tests.references.gguf_gemm import UNIT, dequant64
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _check(name: str, t: int, n: int, k: int, dtype: torch.dtype, seed: int, split: int | None,
           device: str = "cpu", bias: bool = False) -> None:
    raw = gguf_weight(name, (n,), k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    codes, dx, _ = quantize_activation(x)
    nb = k // 32
    xq = (codes.cpu().double().view(t, nb, 32) * dx.cpu().double()[..., None]).view(t, k)
    w64 = dequant64(raw, name)
    prod = xq @ w64.T
    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
    got = mmq_i8(x.to(device), raw.to(device), name, out=out, split=split,
                 bias=None if b is None else b.to(device))
    assert got is out
    u = UNIT[dtype] if dtype != torch.float32 else 2.0 ** -24
    terms = xq.abs() @ w64.abs().T
    tol = (nb + 2) * 2.0 ** -24 * terms + u * prod.abs()
    ref = prod
    if b is not None:  # one more rounding, of a sum of size <= |prod| + |b|
        ref = prod + b.double()
        tol = tol + u * (prod.abs() + b.double().abs()) * 2
    err = (got.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"{name}: worst err/tol {(err / tol).max():.3g}"
    # against the exact x: the int8 rounding of x adds at most dx/2 a value
    exact = x.double() @ w64.T + (0.0 if b is None else b.double())
    round_x = (dx.cpu().double()[:, :, None] / 2 * w64.abs().view(n, nb, 32).sum(-1).T[None]).sum(1)
    assert bool(((got.cpu().double() - exact).abs() <= tol + round_x + 1e-12).all())


@pytest.mark.parametrize("name", I8_FORMATS)
@pytest.mark.parametrize(("t", "split"), [(3, 1), (5, 3), (17, 2)])
def test_against_float64(name: str, t: int, split: int) -> None:
    _check(name, t, 37, 7 * 32, torch.float16, seed=t * 10 + split, split=split)


def test_fp32_bias_default_split() -> None:
    _check("q4_0", 3, 21, 20 * 32, torch.float32, seed=5, split=None, bias=True)


def test_rejects_other_formats() -> None:
    raw = gguf_weight("q4_k", (5,), 256, seed=1)
    with pytest.raises(ValueError, match="mmq_i8 reads"):
        mmq_i8(torch.randn(3, 256), raw, "q4_k")


@pytest.mark.gpu
@pytest.mark.parametrize("name", I8_FORMATS)
@pytest.mark.parametrize(("t", "n", "k"), [(8, 1024, 4096), (33, 4096, 12288), (64, 12288, 4096)])
def test_air_shapes_on_gpu(name: str, t: int, n: int, k: int) -> None:
    _check(name, t, n, k, torch.bfloat16, seed=7, split=None, device="cuda")


@pytest.mark.gpu
def test_captured_in_cuda_graph() -> None:
    raw = gguf_weight("q4_0", (1024,), 4096, seed=9).cuda()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    mmq_i8(x, raw, "q4_0")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mmq_i8(x, raw, "q4_0")
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, mmq_i8(x, raw, "q4_0"))
