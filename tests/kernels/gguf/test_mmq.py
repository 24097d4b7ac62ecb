"""mmq (prefill GEMM over GGUF weight blocks dequantized in tiles) against a float64 reference.

Reference: gguf.quants.dequantize of the same bytes, widened to float64, @ the same x values in float64
(tests/references/gguf_gemm.py). Tolerance: its ``dot_tolerance`` (weights rounded to x's dtype, fp32
accumulation over K, output rounded once) plus u_out · |ref|; the derivation is in that module. Outputs
are poisoned with NaN before each call. Shapes are odd (T = 20 and N = 37 are not multiples of the tiles;
K is 3 blocks of 32 values or 2 super-blocks of 256) and the launches cover a full step followed by a
partial one, ragged m and n tiles, and more than one m-tile group.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import GGUF_FORMATS, REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.mmq import MmqConfig, mmq
from tests.references.gguf_gemm import UNIT, dequant64, dot_tolerance
from tests.references.gguf_weights import gguf_weight

# numpy's, from inside the Triton interpreter (a loop bound passed as a runtime int goes through __index__)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The formats the CPU tests must cover in both dtypes (the hot ones); the rest run in fp32 only.
HOT = ("q4_0", "q8_0", "q4_k", "q6_k", "q5_0", "iq4_xs")


def _k_for(name: str) -> int:
    bs = REGISTRY[name].block_size
    return 2 * bs if bs >= 256 else 3 * max(bs, 32)


def _wide_config(name: str) -> MmqConfig:
    """Two blocks a K step (a full step then a partial one for 3 blocks; one partial step for 2)."""
    bs = max(REGISTRY[name].block_size, 32)
    return MmqConfig(block_m=16, block_n=16, block_k=2 * bs, num_warps=4, num_stages=1, group_m=2)


def _check(name: str, t: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu",
           config: MmqConfig | None = None, k: int | None = None) -> None:
    k = _k_for(name) if k is None else k
    raw = gguf_weight(name, (n,), k, seed=seed)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    w64 = dequant64(raw, name)
    ref = x.double() @ w64.T
    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
    got = mmq(x.to(device), raw.to(device), name, out=out, config=config)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    tol = dot_tolerance(x.double(), w64, dtype) + UNIT[dtype] * ref.abs()
    assert bool((err <= tol).all()), f"{name}: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


@pytest.mark.parametrize("name", DECODED)
def test_mmq_fp32_every_format(name: str) -> None:
    _check(name, 20, 37, torch.float32, seed=REGISTRY[name].gguf_type)


@pytest.mark.parametrize("name", HOT)
def test_mmq_fp16_hot_formats(name: str) -> None:
    # default launch, then 16 x 16 tiles in groups of 2 m-tiles and a K step of two blocks
    _check(name, 20, 37, torch.float16, seed=100 + REGISTRY[name].gguf_type)
    _check(name, 37, 21, torch.float16, seed=200 + REGISTRY[name].gguf_type, config=_wide_config(name))


def test_mmq_float_types_partial_step() -> None:
    # one-value "blocks": K = 80 over 64-value steps, a partial second step
    cfg = MmqConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1)
    for name in ("f16", "bf16", "f32"):
        _check(name, 17, 19, torch.float16, seed=7, config=cfg, k=80)


def test_mmq_one_token_and_empty() -> None:
    _check("q8_0", 1, 5, torch.float32, seed=8)
    raw = gguf_weight("q8_0", (5,), 64, seed=9)
    assert mmq(torch.randn(0, 64), raw, "q8_0").shape == (0, 5)


def test_mmq_epilogue_rounds_as_torch() -> None:
    # bias and residual: bit for bit the unfused torch adds on the kernel's own y, out a column slice of
    # a wider buffer and residual that very slice (out += W x + b); the rest of the buffer stays NaN.
    t, n, k, dtype = 19, 23, 96, torch.float16
    raw = gguf_weight("q5_0", (n,), k, seed=10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(t, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    residual = torch.randn(t, n, generator=gen).to(dtype)
    plain = mmq(x, raw, "q5_0")
    assert torch.equal(mmq(x, raw, "q5_0", bias=bias, residual=residual), (plain + bias) + residual)
    wide = torch.full((t, n + 5), float("nan"), dtype=dtype)
    wide[:, 2:2 + n] = residual
    view = wide[:, 2:2 + n]
    assert mmq(x, raw, "q5_0", out=view, bias=bias, residual=view) is view
    assert torch.equal(view, (plain + bias) + residual)
    assert bool(wide[:, :2].isnan().all()) and bool(wide[:, 2 + n:].isnan().all())


def test_mmq_rejects_bad_input() -> None:
    raw = gguf_weight("q8_0", (5,), 64, seed=1)
    x = torch.randn(17, 64)
    with pytest.raises(ValueError, match="fmt"):
        mmq(x, raw, "q9_9")
    undecoded = [name for name in GGUF_FORMATS if name not in DECODED]
    if undecoded:
        with pytest.raises(ValueError, match="fmt: no device decoder"):
            mmq(x, raw, undecoded[0])
    with pytest.raises(ValueError, match="x dtype"):
        mmq(x.to(torch.int32), raw, "q8_0")
    with pytest.raises(ValueError, match="weight must be"):
        mmq(x, raw.view(torch.int8), "q8_0")
    with pytest.raises(ValueError, match="K=32"):
        mmq(x[:, :32], raw, "q8_0")
    with pytest.raises(ValueError, match="out"):
        mmq(x, raw, "q8_0", out=torch.empty(17, 4))
    with pytest.raises(ValueError, match="bias"):
        mmq(x, raw, "q8_0", bias=torch.randn(4))
    buf = torch.randn(17, 6)
    with pytest.raises(ValueError, match="residual overlaps out"):
        mmq(x, raw, "q8_0", out=buf[:, :5], residual=buf[:, 1:])
    with pytest.raises(ValueError, match="block_k"):
        mmq(x, raw, "q8_0", config=MmqConfig(16, 16, 48, 4, 1))
    with pytest.raises(ValueError, match=">= 16"):
        mmq(x, raw, "q8_0", config=MmqConfig(8, 16, 32, 4, 1))
    k_raw = gguf_weight("q4_k", (5,), 256, seed=2)
    with pytest.raises(ValueError, match="whole number of 256"):
        mmq(torch.randn(17, 256), k_raw, "q4_k", config=MmqConfig(16, 16, 128, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("name", DECODED)
def test_mmq_bf16_on_gpu(name: str) -> None:
    # Compiled kernels (inline-PTX decoder paths the interpreter never runs), default and wide launches,
    # bf16 (wrong in the interpreter) and fp32 (IEEE dot).
    _check(name, 300, 333, torch.bfloat16, seed=300 + REGISTRY[name].gguf_type, device="cuda",
           k=8 * max(REGISTRY[name].block_size, 32) if REGISTRY[name].block_size < 256 else 4 * 256)
    _check(name, 37, 21, torch.bfloat16, seed=400, device="cuda", config=_wide_config(name))
    _check(name, 45, 70, torch.float32, seed=500, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("q4_0", "q4_k", "q5_0", "q6_k", "q8_0", "iq4_xs"))
@pytest.mark.parametrize("shape", [(512, 12288, 4096), (700, 4096, 12288)])
def test_mmq_air_shapes_on_gpu(name: str, shape: tuple[int, int, int]) -> None:
    # GLM-4.5-Air q_proj / o_proj shapes (T, N, K), the default GPU launch.
    t, n, k = shape
    _check(name, t, n, torch.bfloat16, seed=600, device="cuda", k=k)


def test_launch_shrinks_to_fit_shared_memory() -> None:
    # A GPU with less shared memory per block than Hopper refuses the default tiles at the first launch
    # (Triton's OutOfResources): the launcher tries fewer stages, then smaller tiles, and remembers the fit.
    from triton.runtime.errors import OutOfResources

    from glmtg.kernels.gguf.mmq import launch_fitted

    tried = []

    def launch(c: MmqConfig) -> None:
        tried.append((c.block_m, c.block_n, c.num_stages))
        need = (c.num_stages * c.block_m + c.block_n) * c.block_k * 2
        if need > 90 * 1024:
            raise OutOfResources(need, 90 * 1024, "shared memory")

    start = MmqConfig(block_m=128, block_n=64, block_k=256, num_warps=8, num_stages=2)
    launch_fitted(("test", 1), start, launch)
    assert tried == [(128, 64, 2), (128, 64, 1), (64, 64, 1)]
    tried.clear()
    launch_fitted(("test", 1), start, launch)  # remembered: no failed tries again
    assert tried == [(64, 64, 1)]
    with pytest.raises(OutOfResources):
        launch_fitted(("test", 2), MmqConfig(16, 16, 4096, 4, 1), launch)
