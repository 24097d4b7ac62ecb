"""mmvq's epilogue (bias, residual, residual aliasing out) and ``out`` as a column slice of a wider buffer.

The reference is exact, not a tolerance: the epilogue must round as the unfused torch sequence does, so
mmvq(x, W, bias=b, residual=r) must equal (mmvq(x, W) + b) + r computed by torch in x's dtype, bit for
bit (the same accumulator: mmvq without epilogue; the adds are torch's, each rounded to the dtype).
test_mmvq.py checks the accumulator itself against float64. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.gguf.mmvq import mmvq
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

K = 96  # q4_0: 3 blocks, one partial step at block_n 16 / default steps
N = 37  # 16 rows a program: 3 programs, the last ragged


def _case(dtype: torch.dtype, t: int, seed: int, device: str = "cpu"):
    raw = gguf_weight("q4_0", (N,), K, seed=seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, K, generator=gen).to(dtype).to(device)
    # bias and residual of the outputs' size, so that each add rounds (fp16: drops low bits)
    bias = (torch.randn(N, generator=gen) * 3).to(dtype).to(device)
    wide = (torch.randn(t, N + 11, generator=gen) * 3).to(dtype).to(device)
    residual = wide[:, 5:5 + N]  # strided: a column slice, rows N + 11 apart
    return x, raw, bias, residual


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 3])
def test_epilogue_equals_the_torch_sequence(dtype: torch.dtype, t: int, device: str = "cpu") -> None:
    x, raw, bias, residual = _case(dtype, t, seed=10 + t, device=device)
    y = mmvq(x, raw, "q4_0", block_n=16)
    for b, r in ((bias, None), (None, residual), (bias, residual)):
        want = y if b is None else y + b
        want = want if r is None else want + r
        out = torch.full((t, N), float("nan"), dtype=dtype, device=device)
        got = mmvq(x, raw, "q4_0", out=out, bias=b, residual=r, block_n=16)
        assert got is out
        assert torch.equal(got, want), f"bias {b is not None}, residual {r is not None}"
    if dtype == torch.float16:
        # the test tells the rounding orders apart: one rounding of the exact sum differs somewhere
        once = (y.double() + bias.double() + residual.double()).to(dtype)
        assert not torch.equal(once, (y + bias) + residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 3])
def test_epilogue_equals_the_torch_sequence_on_gpu(dtype: torch.dtype, t: int) -> None:
    # compiled: the adds must not be contracted or reassociated, bf16 rounded to nearest-even
    test_epilogue_equals_the_torch_sequence(dtype, t, device="cuda")
    test_residual_may_be_out(dtype, device="cuda")


def test_out_as_column_slices() -> None:
    # two weights into one [T, N_total] buffer, side by side (no torch.cat); the rest stays NaN
    t, dtype = 3, torch.float16
    x, raw, bias, _ = _case(dtype, t, seed=20)
    raw2 = gguf_weight("q8_0", (9,), K, seed=21)
    buf = torch.full((t, 4 + N + 9 + 3), float("nan"), dtype=dtype)
    a, b = buf[:, 4:4 + N], buf[:, 4 + N:4 + N + 9]
    assert mmvq(x, raw, "q4_0", out=a, bias=bias) is a
    assert mmvq(x, raw2, "q8_0", out=b) is b
    assert torch.equal(buf[:, 4:4 + N + 9], torch.cat([mmvq(x, raw, "q4_0") + bias, mmvq(x, raw2, "q8_0")], dim=1))
    assert bool(buf[:, :4].isnan().all()) and bool(buf[:, 4 + N + 9:].isnan().all())


def test_residual_may_be_out(dtype: torch.dtype = torch.float16, device: str = "cpu") -> None:
    # out += W x + bias, in place, out a column slice of a wider buffer
    t = 3
    x, raw, bias, residual = _case(dtype, t, seed=30, device=device)
    before = residual.clone()
    rest = residual.new_full((t, 4), float("nan"))
    wide = torch.cat([residual, rest], dim=1)
    out = wide[:, :N]
    got = mmvq(x, raw, "q4_0", out=out, bias=bias, residual=out, block_n=16)
    assert got is out
    assert torch.equal(out, (mmvq(x, raw, "q4_0", block_n=16) + bias) + before)
    assert bool(wide[:, N:].isnan().all())


def test_epilogue_rejects_bad_input() -> None:
    t = 3
    x, raw, bias, residual = _case(torch.float32, t, seed=40)
    with pytest.raises(ValueError, match="bias"):
        mmvq(x, raw, "q4_0", bias=bias[:-1])
    with pytest.raises(ValueError, match="bias"):
        mmvq(x, raw, "q4_0", bias=bias.half())
    with pytest.raises(ValueError, match="bias"):
        mmvq(x, raw, "q4_0", bias=torch.randn(N, 2)[:, 0])  # not contiguous
    with pytest.raises(ValueError, match="residual"):
        mmvq(x, raw, "q4_0", residual=residual[:2])
    with pytest.raises(ValueError, match="residual"):
        mmvq(x, raw, "q4_0", residual=torch.randn(N, t).t())  # column stride t
    with pytest.raises(ValueError, match="residual"):
        mmvq(x, raw, "q4_0", residual=residual.double())
    buf = torch.randn(t, N + 1)
    with pytest.raises(ValueError, match="residual overlaps out"):
        mmvq(x, raw, "q4_0", out=buf[:, :N], residual=buf[:, 1:])
    with pytest.raises(ValueError, match="out"):
        mmvq(x, raw, "q4_0", out=torch.randn(N, t).t())  # column stride t
    with pytest.raises(ValueError, match="out"):
        mmvq(x, raw, "q4_0", out=torch.randn(t * N).as_strided((t, N), (N - 1, 1)))  # rows overlap
    with pytest.raises(ValueError, match="out"):
        mmvq(x, raw, "q4_0", out=torch.randn(t, N).half())
