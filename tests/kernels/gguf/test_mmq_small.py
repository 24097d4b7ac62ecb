"""mmq_small (decode-batch GEMM over GGUF weights, K split into pieces summed in order) against float64.

Reference: gguf.quants.dequantize of the same bytes in float64 @ the same x values in float64
(tests/references/gguf_gemm.py). Tolerance: its ``dot_tolerance`` (weights rounded to x's dtype, fp32
products and sums over K in any order, which covers the pieces' partial sums, output rounded once) plus
u_out · |ref|. Activations are not rounded to int8 on this path (unlike mmvq), so no int8 term. Outputs are
poisoned with NaN. Shapes are odd: T = 3, 5, 17 (not a multiple of the 16-row m-tile), N = 37 (not a
multiple of the n-tile), K = 7 blocks of 32 or 3 super-blocks cut into pieces of unequal length.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.mmq import MmqConfig
from glmtg.kernels.gguf.mmq_small import mmq_small
from glmtg.kernels.gguf.small_batch import FORMATS, dense_config, split_for
from tests.references.gguf_gemm import UNIT, dequant64, dot_tolerance
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _k_for(name: str) -> int:
    bs = REGISTRY[name].block_size
    return 3 * bs if bs >= 256 else 7 * bs


def _config(name: str) -> MmqConfig:
    """One block a K step: K = 7 blocks in pieces of 3, 3, 1 steps (split 3), or 3 super-blocks in 1, 1, 1."""
    bs = REGISTRY[name].block_size
    return MmqConfig(block_m=16, block_n=16, block_k=bs, num_warps=4, num_stages=1, group_m=1)


def _check(name: str, t: int, n: int, dtype: torch.dtype, seed: int, *, split: int | None, device: str = "cpu",
           config: MmqConfig | None = None, k: int | None = None) -> None:
    k = _k_for(name) if k is None else k
    raw = gguf_weight(name, (n,), k, seed=seed)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    w64 = dequant64(raw, name)
    ref = x.double() @ w64.T
    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
    got = mmq_small(x.to(device), raw.to(device), name, out=out, config=config, split=split)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    tol = dot_tolerance(x.double(), w64, dtype) + UNIT[dtype] * ref.abs()
    assert bool((err <= tol).all()), f"{name}: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


@pytest.mark.parametrize("name", FORMATS)
def test_split_pieces_every_small_batch_format(name: str) -> None:
    _check(name, 5, 37, torch.float16, seed=REGISTRY[name].gguf_type, split=3, config=_config(name))


@pytest.mark.parametrize("t", (3, 17))
def test_split_and_whole_q4_0_fp32(t: int) -> None:
    # fp32 x: exact products (IEEE dot), so the bound is the fp32 sums alone; split 1 is mmq's own kernel.
    for split in (1, 2, 7):
        _check("q4_0", t, 21, torch.float32, seed=40 + split, split=split, config=_config("q4_0"))


def test_default_launch() -> None:
    # the interpreter's default tiles and split (4 "SMs": 2 n-tiles < 8 programs, so K is cut)
    _check("q6_k", 3, 37, torch.float16, seed=60, split=None, k=4 * 256)


def test_split_epilogue_rounds_as_torch() -> None:
    # bias and residual on the split path: the unfused torch adds on the kernel's own y; out a column slice
    # of a wider buffer and residual that very slice; the rest of the buffer stays NaN.
    t, n, k, dtype = 5, 23, 7 * 32, torch.float16
    raw = gguf_weight("q8_0", (n,), k, seed=70)
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(t, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    residual = torch.randn(t, n, generator=gen).to(dtype)
    cfg = _config("q8_0")
    plain = mmq_small(x, raw, "q8_0", config=cfg, split=3)
    assert torch.equal(mmq_small(x, raw, "q8_0", bias=bias, residual=residual, config=cfg, split=3),
                       (plain + bias) + residual)
    wide = torch.full((t, n + 5), float("nan"), dtype=dtype)
    wide[:, 2:2 + n] = residual
    view = wide[:, 2:2 + n]
    assert mmq_small(x, raw, "q8_0", out=view, bias=bias, residual=view, config=cfg, split=3) is view
    assert torch.equal(view, (plain + bias) + residual)
    assert bool(wide[:, :2].isnan().all()) and bool(wide[:, 2 + n:].isnan().all())


def test_split_plan() -> None:
    # two programs an SM are enough: big outputs are not cut; small ones are, at most one piece per 4 steps
    cfg = dense_config(32, 8, on_gpu=True)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 64, 128)
    assert split_for(cfg, 8, 151552, 4096, 132) == 1
    assert split_for(cfg, 8, 1024, 4096, 132) == 8  # 16 tiles; 32 steps / 4
    assert split_for(cfg, 8, 4096, 12288, 132) == 5  # 64 tiles -> ceil(264 / 64)
    assert dense_config(256, 64, on_gpu=True).block_n == 32


def test_rejects_bad_split() -> None:
    raw = gguf_weight("q8_0", (5,), 64, seed=1)
    with pytest.raises(ValueError, match="split"):
        mmq_small(torch.randn(3, 64), raw, "q8_0", split=0)
    with pytest.raises(ValueError, match="K=32"):
        mmq_small(torch.randn(3, 32), raw, "q8_0")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("q4_0", "q4_k", "q5_0", "q6_k", "q8_0"))
@pytest.mark.parametrize("shape", [(8, 1024, 4096), (33, 4096, 12288), (64, 12288, 4096), (2, 2048, 1408)])
def test_air_shapes_on_gpu(name: str, shape: tuple[int, int, int]) -> None:
    # GLM-4.5-Air k_proj / o_proj / q_proj / shared-down shapes (T, N, K) at the default GPU launch, bf16
    t, n, k = shape
    if k % REGISTRY[name].block_size:
        pytest.skip("K not whole super-blocks")
    _check(name, t, n, torch.bfloat16, seed=80, split=None, device="cuda", k=k)


@pytest.mark.gpu
def test_captured_in_cuda_graph() -> None:
    # captured once (split path and whole path), replayed with new x: equal to eager runs on that x
    torch.manual_seed(90)
    for n in (1024, 151552 // 8):
        raw = gguf_weight("q4_0", (n,), 4096, seed=91).cuda()
        x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
        mmq_small(x, raw, "q4_0")  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = mmq_small(x, raw, "q4_0")
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, mmq_small(x, raw, "q4_0"))
