"""QuantLinear and QuantExperts at decode-batch sizes (2..64 tokens): the kernel backend runs the decode-batch
kernels of glmtg/kernels/gguf/small_batch.py (mmq_small for dense products, moe_prefill with small_batch's
launches for the routed experts; the interpreter here), ``GLMTG_SMALL_BATCH=old`` (``MODE``) the paths
from before, T = 1 the GEMV.

Which path ran is observed by wrapping the launchers (monkeypatch). Values against float64 with the bounds
of tests/references/gguf_gemm.py (derivations there): activations are not rounded to int8 on these paths,
so no int8 term; QuantLinear adds bias and residual in x's dtype after the product (one rounding each).
Token counts are odd (3, 5, 17: not multiples of the 16-row m-tile); the experts' routing repeats experts
(17 tokens on one expert: two m-tiles of it).
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf import mmq_moe as moe_module
from glmtg.kernels.gguf import mmq_small as small_module
from glmtg.kernels.gguf import small_batch
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantLinear
from tests.references.gguf_gemm import UNIT, dot_tolerance, moe_reference
from tests.references.model import tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, inside the interpreter

EXPERT_FORMATS = {"gate_proj": "q4_0", "up_proj": "q4_0", "down_proj": "q8_0"}


@pytest.fixture
def calls(monkeypatch):
    """Launches of mmq_small and moe_prefill (with their keyword arguments), the real kernels still running."""
    seen: dict[str, list] = {"mmq_small": [], "moe_prefill": []}

    def wrap(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            seen[name].append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap(small_module, "mmq_small")
    wrap(moe_module, "moe_prefill")
    monkeypatch.setattr(small_batch, "MODE", "new")
    monkeypatch.setattr(small_batch, "EXPERTS", "new")  # off by default (DECISIONS J2); tested here
    monkeypatch.setattr(small_batch, "MAX_TOKENS", 64)
    return seen


def _linear(blocks, dtype: torch.dtype, seed: int):
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(seed)
    k = 256
    shards = (("q", 5), ("k", 3), ("v", 3))  # q/k in one q4_k run, v in q6_k (a Q4_K_M file's attention)
    lin = QuantLinear(k, shards, bias=True, formats={"q": "q4_k", "k": "q4_k", "v": "q6_k"}, dtype=dtype,
                      backend="kernel")
    ws = []
    for name, rows in shards:
        raw = random_blocks((rows, k), lin.formats[name], gen)
        lin.load_shard("weight", name, raw)
        ws.append(values(raw, lin.formats[name]))
    lin.load_shard("bias", None, torch.randn(11, generator=gen).to(dtype))
    return lin, torch.cat(ws), gen


@pytest.mark.parametrize(("t", "dtype"), [(3, torch.float16), (5, torch.float32), (17, torch.float16)])
def test_linear_decode_batch_runs_mmq_small(blocks, calls, t, dtype):
    lin, w64, gen = _linear(blocks, dtype, seed=t)
    x = torch.randn(t, 256, generator=gen).to(dtype)
    res = torch.randn(t, 11, generator=gen).to(dtype)
    y = lin(x, residual=res)
    assert len(calls["mmq_small"]) == 2  # one launch per run of shards
    prod = x.double() @ w64.T
    ref = prod + lin.bias.double() + res.double()
    u = UNIT[dtype]
    # the product's bound, then two more roundings (bias, residual) of sums of size <= |prod| + |b| + |res|
    tol = dot_tolerance(x.double(), w64, dtype) + u * (prod.abs() + 2 * (ref.abs() + lin.bias.double().abs()
                                                                      + res.double().abs()))
    err = (y.double() - ref).abs()
    assert y.dtype == dtype and bool((err <= tol).all()), float((err / tol).max())
    assert not lin.int8_decode(x)  # the fused SwiGLU's int8 route stays off for these sizes


def test_linear_old_mode_and_one_token_keep_their_paths(blocks, calls, monkeypatch):
    lin, _, gen = _linear(blocks, torch.float32, seed=20)
    lin(torch.randn(1, 256, generator=gen))  # T = 1: the GEMV
    assert calls["mmq_small"] == []
    monkeypatch.setattr(small_batch, "MODE", "old")
    lin(torch.randn(3, 256, generator=gen))
    assert calls["mmq_small"] == []
    monkeypatch.setattr(small_batch, "MODE", "new")
    monkeypatch.setattr(small_batch, "EXPERTS", "new")  # off by default (DECISIONS J2); tested here
    monkeypatch.setattr(small_batch, "MAX_TOKENS", 64)
    lin.gemm = "dequant"  # the A/B switch of the layer keeps the old paths too
    lin(torch.randn(3, 256, generator=gen))
    assert calls["mmq_small"] == []


def test_linear_int8_dot_switch(blocks, calls, monkeypatch):
    # DOT = "int8": q4_0 / q8_0 runs take mmq_i8 (its own tests bound its values), other formats mmq_small
    from glmtg.kernels.gguf import mmq_i8 as i8_module

    seen = []
    real = i8_module.mmq_i8
    monkeypatch.setattr(i8_module, "mmq_i8", lambda *a, **kw: seen.append(a[2]) or real(*a, **kw))
    monkeypatch.setattr(small_batch, "DOT", "int8")
    random_blocks, _ = blocks
    gen = torch.Generator().manual_seed(25)
    lin = QuantLinear(64, (("a", 7), ("b", 5)), bias=False, formats={"a": "q4_0", "b": "q5_0"},
                      dtype=torch.float32, backend="kernel")
    raws = [random_blocks((7, 64), "q4_0", gen), random_blocks((5, 64), "q5_0", gen)]
    lin.load_shard("weight", "a", raws[0])
    lin.load_shard("weight", "b", raws[1])
    x = torch.randn(5, 64, generator=gen)
    y = lin(x)
    assert seen == ["q4_0"] and len(calls["mmq_small"]) == 1
    assert torch.equal(y[:, :7], real(x, raws[0], "q4_0"))


def _experts(blocks, dtype: torch.dtype, seed: int):
    random_blocks, values = blocks
    config = tiny(hidden_size=96, moe_intermediate_size=64, n_routed_experts=5)
    gen = torch.Generator().manual_seed(seed)
    experts = QuantExperts(config, dtype, EXPERT_FORMATS, backend="kernel")
    full = {}
    for p, shape in (("gate_proj", (5, 64, 96)), ("up_proj", (5, 64, 96)), ("down_proj", (5, 96, 64))):
        raw = random_blocks(shape, EXPERT_FORMATS[p], gen)
        full[p] = values(raw, EXPERT_FORMATS[p])
        experts.load_expert(p, None, raw)
    return experts, full, gen


@pytest.mark.parametrize(("t", "dtype"), [(3, torch.float16), (17, torch.float32)])
def test_experts_decode_batch_run_grouped_gemm(blocks, calls, t, dtype):
    experts, full, gen = _experts(blocks, dtype, seed=30 + t)
    x = (torch.randn(t, 96, generator=gen) / 40).to(dtype)
    # slot 0: expert 3 for every token (17 pairs: two 16-pair tiles of one expert); slot 1 any other
    others = torch.tensor([0, 1, 2, 4])
    ids = torch.stack([torch.full((t,), 3), others[torch.randint(0, 4, (t,), generator=gen)]], 1)
    weights = torch.rand(t, 2, generator=gen) + 0.1
    assert not experts._kernel(x, 2 * t) and experts.shared_blocks(x, None) is None
    y = experts(x, ids, weights)
    assert len(calls["moe_prefill"]) == 1 and y.dtype == dtype
    kw = calls["moe_prefill"][0]
    assert kw["gate_up_config"] == small_batch.moe_configs(32, 32, on_gpu=False)[0]
    ref, tol = moe_reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights, dtype)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


def test_experts_int8_dot_switch(blocks, calls, monkeypatch):
    # DOT = "int8" with q4_0 / q8_0 stacks: moe_i8 (its own tests bound its values), not moe_prefill
    from glmtg.kernels.gguf import moe_i8 as i8_module

    seen = []
    real = i8_module.moe_i8
    monkeypatch.setattr(i8_module, "moe_i8", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    monkeypatch.setattr(small_batch, "DOT", "int8")
    experts, _, gen = _experts(blocks, torch.float32, seed=45)
    x = torch.randn(3, 96, generator=gen) / 40
    ids = torch.tensor([[0, 1], [1, 2], [4, 1]])
    w = torch.rand(3, 2, generator=gen)
    y = experts(x, ids, w)
    assert seen == [1] and calls["moe_prefill"] == []
    assert torch.equal(y, real(x, experts.gate_proj, experts.up_proj, experts.down_proj, ids, w, "q4_0", "q8_0"))


def test_experts_old_mode_keep_the_decode_kernel(blocks, calls, monkeypatch):
    experts, _, gen = _experts(blocks, torch.float32, seed=40)
    x = torch.randn(2, 96, generator=gen) / 40
    monkeypatch.setattr(small_batch, "MODE", "old")
    assert experts._kernel(x, 4)  # 4 pairs <= 5 experts: the per-pair decode kernel, as before
    experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2, generator=gen))
    assert calls["moe_prefill"] == []


def test_switches_from_the_environment(monkeypatch):
    monkeypatch.setenv("GLMTG_SMALL_BATCH", "newer")
    with pytest.raises(ValueError, match="GLMTG_SMALL_BATCH"):
        small_batch._env_mode()
    monkeypatch.setenv("GLMTG_SMALL_BATCH", "old")
    assert small_batch._env_mode() == "old"
    monkeypatch.setenv("GLMTG_SMALL_BATCH_DOT", "int4")
    with pytest.raises(ValueError, match="GLMTG_SMALL_BATCH_DOT"):
        small_batch._env_dot()
    monkeypatch.setenv("GLMTG_SMALL_BATCH_MAX", "lots")
    with pytest.raises(ValueError, match="GLMTG_SMALL_BATCH_MAX"):
        small_batch._env_tokens("GLMTG_SMALL_BATCH_MAX", 64)
    monkeypatch.setenv("GLMTG_SMALL_BATCH_MAX", "32")
    assert small_batch._env_tokens("GLMTG_SMALL_BATCH_MAX", 64) == 32


def test_takes(monkeypatch):
    monkeypatch.setattr(small_batch, "MODE", "new")
    monkeypatch.setattr(small_batch, "EXPERTS", "new")  # off by default (DECISIONS J2); tested here
    monkeypatch.setattr(small_batch, "MAX_TOKENS", 64)
    assert small_batch.takes(2, "q4_0", "q6_k") and small_batch.takes(64, "q8_0")
    assert not small_batch.takes(1, "q4_0") and not small_batch.takes(65, "q4_0")
    assert not small_batch.takes(8, "q4_0", "iq2_xxs")  # a format outside FORMATS keeps its path
    assert small_batch.takes_experts(8, "q4_0")
    monkeypatch.setattr(small_batch, "EXPERTS", "old")
    assert small_batch.takes(8, "q4_0") and not small_batch.takes_experts(8, "q4_0")
    monkeypatch.setattr(small_batch, "MODE", "old")
    assert not small_batch.takes(8, "q4_0")



def _gpu_blocks(shape: tuple[int, ...], fmt: str, width: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [*shape, row bytes] of rows of ``width`` values in ``fmt``, random bytes made on the GPU with bit
    6 of every byte cleared: each fp16 field then has an exponent below 16 (finite scales under 2)."""
    f = REGISTRY[fmt]
    return torch.randint(0, 256, (*shape, width // f.block_size * f.type_size), dtype=torch.uint8, device="cuda",
                         generator=gen) & 0xBF


def _gpu_values(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    return REGISTRY[fmt].dequantize_blocks(raw).double()


@pytest.mark.gpu
@pytest.mark.parametrize("t", (2, 8, 17, 64))
def test_air_experts_on_gpu_captured(t, monkeypatch):
    """GLM-4.5-Air's experts layer (128 experts, I = 1408, H = 4096; q4_0 gate/up, q8_0 down as a Q4_0 file)
    in bf16: against float64, then captured in a CUDA graph and replayed with new x, routing and weights,
    bit-equal to eager runs on those (the path is deterministic). T = 17: every token on expert 5 in slot 0
    (two m-tiles of one expert).

    Bound (float64, per pair): bf16 rounds the weights, act and each pair's output (u = 2^-8 each) and sums
    in fp32: |err act| <= 2^-7 (1.1 |up| Σ|x||Wg| + |silu g| Σ|x||Wu|) + u |act|, then through down:
    <= 2^-5 · (A @ |D|ᵀ) with A = 1.1 |up| Σ|x||Wg| + |silu g| Σ|x||Wu| + |act| (a margin of 2 over the sum
    of the four terms); out: Σ_s |w_s| · that + 2^-7 |ref| (one fp32 sum and its rounding)."""
    from glmtg.config import ModelConfig

    monkeypatch.setattr(small_batch, "MODE", "new")
    monkeypatch.setattr(small_batch, "EXPERTS", "new")  # off by default (DECISIONS J2); tested here
    monkeypatch.setattr(small_batch, "MAX_TOKENS", 64)
    gen = torch.Generator(device="cuda").manual_seed(50 + t)
    with torch.device("meta"):
        experts = QuantExperts(ModelConfig.preset("glm-4.5-air"), torch.bfloat16, EXPERT_FORMATS, backend="kernel")
    for p, (rows, width) in (("gate_proj", (1408, 4096)), ("up_proj", (1408, 4096)), ("down_proj", (4096, 1408))):
        experts.load_expert(p, None, _gpu_blocks((128, rows), EXPERT_FORMATS[p], width, gen))

    def inputs():
        x = (torch.randn(t, 4096, device="cuda", generator=gen) / 16).to(torch.bfloat16)
        ids = torch.rand(t, 128, device="cuda", generator=gen).argsort(dim=1)[:, :8]
        if t == 17:
            ids = torch.where(ids == 5, ids[:, :1], ids)  # expert 5 out of the other slots, then into slot 0
            ids[:, 0] = 5
        return x, ids, torch.rand(t, 8, device="cuda", generator=gen)

    x, ids, wts = inputs()
    y = experts(x, ids, wts)
    ref = torch.zeros(t, 4096, dtype=torch.float64, device="cuda")
    tol = torch.zeros_like(ref)
    x64 = x.double()
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        wg, wu, wd = (_gpu_values(getattr(experts, p)[e], EXPERT_FORMATS[p])
                      for p in ("gate_proj", "up_proj", "down_proj"))
        xr = x64[tok]
        g, up = xr @ wg.T, xr @ wu.T
        silu = g * torch.sigmoid(g)
        mag = 1.1 * up.abs() * (xr.abs() @ wg.abs().T) + silu.abs() * (xr.abs() @ wu.abs().T) + (silu * up).abs()
        w = wts[tok, slot].double()[:, None]
        ref.index_add_(0, tok, w * ((silu * up) @ wd.T))
        tol.index_add_(0, tok, w.abs() * 2.0 ** -5 * (mag @ wd.abs().T))
    tol += 2.0 ** -7 * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())

    static = [v.clone() for v in (x, ids, wts)]
    experts(*static)  # compiled and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts(*static)
    for _ in range(2):
        for buf, new in zip(static, inputs()):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, experts(*static))


@pytest.mark.gpu
@pytest.mark.parametrize("t", (3, 8, 33, 64))
@pytest.mark.parametrize(("fmt", "n", "k"), [("q4_0", 4096, 12288), ("q6_k", 151552 // 4, 4096), ("q4_k", 1024, 4096)])
def test_air_linear_on_gpu_captured(t, fmt, n, k, monkeypatch):
    """Air's o_proj (q4_0), a quarter of the lm_head (q6_k) and k_proj with a bias (q4_k) in bf16 with a
    residual: against float64 (dot_tolerance: weights rounded to bf16, fp32 sums; plus the bias and residual
    roundings), then captured in a CUDA graph and replayed with new x and residual, equal to eager runs."""
    monkeypatch.setattr(small_batch, "MODE", "new")
    monkeypatch.setattr(small_batch, "EXPERTS", "new")  # off by default (DECISIONS J2); tested here
    monkeypatch.setattr(small_batch, "MAX_TOKENS", 64)
    gen = torch.Generator(device="cuda").manual_seed(t)
    with torch.device("meta"):
        lin = QuantLinear(k, n, bias=fmt == "q4_k", formats=fmt, dtype=torch.bfloat16, backend="kernel")
    lin.load_shard("weight", None, _gpu_blocks((n,), fmt, k, gen))
    if lin.bias is not None:
        lin.bias = torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16),
                                      requires_grad=False)
    x = (torch.randn(t, k, device="cuda", generator=gen) / 16).to(torch.bfloat16)
    res = torch.randn(t, n, device="cuda", generator=gen).to(torch.bfloat16)
    y = lin(x, residual=res)
    w64 = _gpu_values(lin.weight, fmt)
    prod = x.double() @ w64.T
    bias = 0.0 if lin.bias is None else lin.bias.double()
    ref = prod + bias + res.double()
    u = UNIT[torch.bfloat16]
    tol = dot_tolerance(x.double(), w64, torch.bfloat16) + u * (prod.abs() + 2 * (ref.abs() + abs(bias) + res.double().abs()))
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())

    static_x, static_res = x.clone(), res.clone()
    lin(static_x, residual=static_res)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lin(static_x, residual=static_res)
    for _ in range(2):
        static_x.copy_((torch.randn(t, k, device="cuda", generator=gen) / 16).to(torch.bfloat16))
        static_res.copy_(torch.randn(t, n, device="cuda", generator=gen).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, lin(static_x, residual=static_res))
