"""The decode kernel's tile dequantization (_load_kv_tile), value for value.

Codes cover every byte value and scales span normal and subnormal fp16 magnitudes. The kernel's fp16
tile must equal fp16(code * d) computed in float32 by torch exactly (fp8: the e4m3 value, whose row scale
the attention kernel applies to scores and probabilities instead): the product of an 8-bit code and
an fp16 scale is exact in float32, so both sides round the same real number once. The inline-PTX path
(ASM_DEQUANT 1; GPU only) and the plain path must both meet this; the CPU interpreter runs the plain one.
Rows past the mask must read as 0.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from glmtg.formats import FORMATS, KernelCode, dequantize
from glmtg.kernels.attention.kernel import _load_kv_tile, _q4_0_order

_Q4_0 = tl.constexpr(int(KernelCode.Q4_0))


@triton.jit
def _tile_kernel(Data, Scale, Out, n_valid, row_len, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 FORMAT: tl.constexpr, ASM_DEQUANT: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_valid
    rows = offs_n.to(tl.int64) * row_len
    scale_rows = offs_n.to(tl.int64) * (HEAD_DIM // 64)  # int32 words: two fp16 scales each
    tile = _load_kv_tile(Data, Scale, rows, scale_rows, mask_n, HEAD_DIM, FORMAT, tl.float16, ASM_DEQUANT)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = _q4_0_order(offs_d) if FORMAT == _Q4_0 else offs_d
    tl.store(Out + offs_n[:, None] * HEAD_DIM + cols[None, :], tile)


def run_tile(fmt: str, asm: int, device: str, block_n: int = 64, head_dim: int = 128, n_valid: int = 61,
             num_warps: int = 4):
    g = torch.Generator().manual_seed(7)
    if fmt == "q8_0":
        data = torch.arange(block_n * head_dim).remainder(256).sub(128).to(torch.int8).view(block_n, head_dim)
    elif fmt == "fp8":  # every e4m3 byte but the two NaN codes (0x7F, 0xFF); the row scale is not applied
        codes = torch.arange(block_n * head_dim).remainder(256).to(torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0
        data = codes.view(torch.float8_e4m3fn).view(block_n, head_dim)
    else:
        data = torch.arange(block_n * head_dim // 2).mul(37).remainder(256).to(torch.uint8).view(block_n, head_dim // 2)
    exponents = torch.randint(-24, 6, (block_n, head_dim // 32), generator=g).float()
    scale = (torch.rand(block_n, head_dim // 32, generator=g) + 1.0).mul(2.0 ** exponents).half()
    scale[0, 0] = 0.0
    out = torch.full((block_n, head_dim), float("nan"), dtype=torch.float16)
    data, scale, out = data.to(device), scale.to(device), out.to(device)
    _tile_kernel[(1,)](data, scale.view(torch.int32), out, n_valid, data.shape[1], HEAD_DIM=head_dim, BLOCK_N=block_n,
                       FORMAT=int(FORMATS[fmt].code), ASM_DEQUANT=asm, num_warps=num_warps)
    want = data.cpu().half() if fmt == "fp8" else dequantize(data.cpu(), scale.cpu(), fmt).half()
    want[n_valid:] = 0.0
    return out.cpu(), want


def assert_same(out: torch.Tensor, want: torch.Tensor) -> None:
    assert not torch.isnan(out).any(), "unwritten tile elements"
    bad = (out.view(torch.int16) != want.view(torch.int16)) & ~((out == 0) & (want == 0))  # +0 == -0
    assert not bad.any(), f"{int(bad.sum())} values differ, first at {bad.nonzero()[0].tolist()}: " \
                          f"{out[bad][:4].tolist()} vs {want[bad][:4].tolist()}"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "fp8"])
def test_plain_dequant_exact_cpu(fmt):
    out, want = run_tile(fmt, asm=0, device="cpu", block_n=16, head_dim=64, n_valid=13)
    assert_same(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "fp8"])
@pytest.mark.parametrize("asm", [1, 0], ids=["asm", "plain"])
@pytest.mark.parametrize("head_dim, block_n", [(128, 64), (64, 128), (256, 32)])
def test_gpu_dequant_exact(fmt, asm, head_dim, block_n):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out, want = run_tile(fmt, asm=asm, device="cuda", block_n=block_n, head_dim=head_dim, n_valid=block_n - 3)
    assert_same(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("asm", [1, 0], ids=["asm", "plain"])
@pytest.mark.parametrize("num_warps", [1, 4])
def test_gpu_q8_0_sixteen_token_tiles(asm, num_warps):
    # The one-warp q8_0 plan runs 16-token tiles; the q4_0 fault (attention/launch.py) hit this height.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out, want = run_tile("q8_0", asm=asm, device="cuda", block_n=16, head_dim=128, n_valid=13, num_warps=num_warps)
    assert_same(out, want)
