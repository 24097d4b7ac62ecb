"""QuantLinear and QuantExperts at prefill sizes: the kernel backend runs the dequantizing GEMMs
(glmtg/kernels/gguf/mmq.py, mmq_moe.py; the interpreter here), the CPU default does not.

Which path ran is observed by wrapping the kernel launchers (monkeypatch), so a test cannot pass on the
old path by accident. Values against float64 with the bounds of tests/references/gguf_gemm.py (derivations
there): QuantLinear adds the bias and residual in x's dtype after the product (one rounding each, u_out of
their sum); QuantExperts' bound is ``moe_reference``'s.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.gguf import mmq as mmq_module
from glmtg.kernels.gguf import mmq_moe as moe_module
from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantLinear
from tests.references.gguf_gemm import UNIT, dot_tolerance, moe_reference
from tests.references.model import tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, inside the interpreter

FORMATS = {"gate_proj": "q4_0", "up_proj": "q4_0", "down_proj": "q5_0"}


@pytest.fixture(autouse=True)
def prefill_paths(monkeypatch):
    """These shapes (9-18 tokens) are a decode batch to glmtg/kernels/gguf/small_batch.py, whose kernels
    tests/layers/test_small_batch.py checks; here the prefill paths run at them."""
    from glmtg.kernels.gguf import small_batch

    monkeypatch.setattr(small_batch, "MODE", "old")


@pytest.fixture
def calls(monkeypatch):
    """Counts of mmq / moe_prefill launches, the real kernels still running."""
    count = {"mmq": 0, "moe_prefill": 0}

    def wrap(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            count[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap(mmq_module, "mmq")
    wrap(moe_module, "moe_prefill")
    return count


def _linear(blocks, backend: str, dtype: torch.dtype, seed: int):
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(seed)
    k = 256
    shards = (("q", 5), ("k", 3), ("v", 3))  # q/k in one q4_k run, v in q6_k (a Q4_K_M file's attention)
    lin = QuantLinear(k, shards, bias=True, formats={"q": "q4_k", "k": "q4_k", "v": "q6_k"}, dtype=dtype,
                      backend=backend)
    ws = []
    for name, rows in shards:
        fmt = lin.formats[name]
        raw = random_blocks((rows, k), fmt, gen)
        lin.load_shard("weight", name, raw)
        ws.append(values(raw, fmt))
    lin.load_shard("bias", None, torch.randn(11, generator=gen).to(dtype))
    return lin, torch.cat(ws), gen


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_quant_linear_prefill_runs_mmq(blocks, calls, dtype):
    lin, w64, gen = _linear(blocks, "kernel", dtype, seed=1)
    lin.gemm = "mmq"  # dense products dequantize + cuBLAS by default (faster, DECISIONS H6)
    x = torch.randn(2, 9, 256, generator=gen).to(dtype)  # 18 tokens: above the GEMV's 16
    res = torch.randn(2, 9, 11, generator=gen).to(dtype)
    y = lin(x, residual=res)
    assert calls["mmq"] == 2  # one launch per run of shards
    x2 = x.view(18, 256).double()
    prod = x2 @ w64.T
    ref = prod + lin.bias.double() + res.view(18, 11).double()
    u = UNIT[dtype]
    # the product's bound, then two more roundings (bias, residual) of sums of size <= |prod| + |b| + |res|
    tol = dot_tolerance(x2, w64, dtype) + u * (prod.abs() + 2 * (ref.abs() + lin.bias.double().abs()
                                                                   + res.view(18, 11).double().abs()))
    err = (y.view(18, 11).double() - ref).abs()
    assert y.dtype == dtype and bool((err <= tol).all()), float((err / tol).max())
    lin.gemm = "dequant"  # the old path, for an A/B check
    assert torch.allclose(lin(x, residual=res).double(), y.double(), rtol=0, atol=float(tol.max()) * 2)
    assert calls["mmq"] == 2


def test_quant_linear_cpu_default_keeps_torch_path(blocks, calls):
    lin, w64, gen = _linear(blocks, "auto", torch.float32, seed=2)
    x = torch.randn(20, 256, generator=gen)
    y = lin(x)
    assert calls["mmq"] == 0
    auto, _, _ = _linear(blocks, "kernel", torch.float32, seed=2)
    auto(x)  # the kernel backend's default for a dense product: dequantize + matmul, not mmq
    assert calls["mmq"] == 0
    ref = x.double() @ w64.T + lin.bias.double()
    assert bool(((y.double() - ref).abs() <= dot_tolerance(x.double(), w64, torch.float32) + 1e-6).all())
    forced, _, _ = _linear(blocks, "kernel", torch.float32, seed=2)
    forced.gemm = "cublas"
    with pytest.raises(ValueError, match="gemm must be one of"):
        forced(x)


def _experts(blocks, backend: str, placement=None, seed: int = 3):
    random_blocks, values = blocks
    config = tiny(hidden_size=96, moe_intermediate_size=64, n_routed_experts=5)
    gen = torch.Generator().manual_seed(seed)
    experts = QuantExperts(config, torch.float32, FORMATS, placement=placement, backend=backend)
    full = {}
    for p, shape in (("gate_proj", (5, 64, 96)), ("up_proj", (5, 64, 96)), ("down_proj", (5, 96, 64))):
        raw = random_blocks(shape, FORMATS[p], gen)
        full[p] = values(raw, FORMATS[p])
        for e in range(5):
            experts.load_expert(p, e, raw[e])
    return experts, full, gen


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_quant_experts_prefill_runs_grouped_gemm(blocks, calls, dtype):
    experts, full, gen = _experts(blocks, "kernel")
    x = (torch.randn(9, 96, generator=gen) / 40).to(dtype)  # 18 pairs > 5 experts: not the decode kernel
    ids = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen) + 0.1
    y = experts(x, ids, weights)
    assert calls["moe_prefill"] == 1 and y.dtype == dtype
    ref, tol = moe_reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights, dtype)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


def test_quant_experts_placement_on_grouped_gemm(blocks, calls):
    """Two modules holding [0, 2) and [2, 5), each on the grouped GEMM, add up to the whole layer."""
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(9)) / 40
    ids = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2] for t in range(9)])
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(10)) + 0.1
    parts = []
    for placement in ExpertPlacement.split(5, 2):
        part, full, _ = _experts(blocks, "kernel", placement=placement, seed=4)
        parts.append(part(x, ids, weights))
    assert calls["moe_prefill"] == 2
    ref, tol = moe_reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights, torch.float32)
    # two partial sums each within their slots' share of the bound, then one fp32 add: 2 x the bound
    assert bool(((parts[0] + parts[1]).double() - ref).abs().le(2 * tol + 2.0 ** -24 * ref.abs()).all())


def test_quant_experts_cpu_default_keeps_loop(blocks, calls):
    experts, _, gen = _experts(blocks, "auto", seed=5)
    x = torch.randn(9, 96, generator=gen) / 40
    ids = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(9)])
    experts(x, ids, torch.rand(9, 2, generator=gen))
    assert calls["moe_prefill"] == 0
