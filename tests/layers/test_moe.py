"""Router and routed experts against float64 references; the many-pairs paths read nothing on the host.

References are plain per-token, per-slot loops in float64 over the very same input values (the loop the
grouped path replaced). Tolerances, relative to max|ref|: fp32 paths differ from it only by fp32 rounding
of g, u, h and y (a few 2^-24 each, summed over <= 40 terms): 1e-5. bf16 paths round g, u, h and each
slot's output to bf16 (unit roundoff 2^-8 each) before the fp32 combine: 3e-2 elementwise and 2e-2 in relative
Frobenius norm (measured 4e-3 to 7e-3 on these cases). A wrong expert or slot moves outputs by O(max|ref|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtg.layers.moe import (
    ExpertPlacement,
    Experts,
    MoE,
    Router,
    dense_experts,
    gathered_experts,
    grouped_experts,
    grouped_mm_applies,
    grouped_mm_experts,
    looped_experts,
)
from tests.references.model import tiny

# numpy's, from inside the Triton interpreter (the kernel backend case)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = {torch.float32: (1e-5, None), torch.bfloat16: (3e-2, 2e-2)}  # (elementwise / max|ref|, Frobenius)


def reference(x, gate, up, down, ids, weights):
    """float64 [T, H]: Σ_k w · down_e(silu(gate_e x) · up_e x), one token and slot at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        xt = x[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            out[t] += float(weights[t, j]) * (down[e].double() @ h)
    return out


def case(tokens, hidden, inter, experts, top_k, dtype, seed=0, skip=(0, 5)):
    """Random weights and routing; experts in ``skip`` get no token (empty groups)."""
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(experts, inter, hidden, generator=g) * hidden ** -0.5).to(dtype)
    up = (torch.randn(experts, inter, hidden, generator=g) * hidden ** -0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    allowed = torch.tensor([e for e in range(experts) if e not in skip])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return x, gate, up, down, ids, weights


def check(y, ref, dtype):
    elem, frob = TOL[dtype]
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= elem * scale
    if frob is not None:
        assert ((y.double() - ref).norm() / ref.norm()).item() < frob


def combine(y, weights, dtype):
    return (y.float() * weights[..., None]).sum(1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(40, 24), (37, 19)], ids=["rows16B", "odd"])
@pytest.mark.parametrize("path", [gathered_experts, grouped_mm_experts, dense_experts, looped_experts,
                                  grouped_experts])
def test_paths_equal_float64_loop(path, hidden, inter, dtype):
    if path is grouped_mm_experts and (hidden, inter) == (37, 19):
        pytest.skip("torch._grouped_mm needs rows of a multiple of 16 bytes (grouped_experts falls back)")
    x, gate, up, down, ids, weights = case(11, hidden, inter, 13, 3, dtype, seed=hidden)  # 33 pairs > 13
    y = path(x, gate, up, down, ids)
    assert y.shape == (11, 3, hidden) and y.dtype == dtype
    check(combine(y, weights, dtype), reference(x, gate, up, down, ids, weights), dtype)


def test_grouped_mm_applies_from_shapes_dtype_and_device():
    x, gate, up, down, _, _ = case(2, 64, 32, 8, 2, torch.float32)
    assert grouped_mm_applies(x, gate, down)  # the tiny preset's shapes on a CPU
    x, gate, _, down, _, _ = case(2, 37, 19, 8, 2, torch.bfloat16)
    assert not grouped_mm_applies(x, gate, down)  # rows of 74 / 38 bytes
    meta = torch.empty(2, 64, device="meta")
    assert not grouped_mm_applies(meta, torch.empty(8, 32, 64, device="meta"), torch.empty(8, 64, 32, device="meta"))
    assert grouped_mm_applies(meta.bfloat16(), torch.empty(8, 32, 64, device="meta", dtype=torch.bfloat16),
                              torch.empty(8, 64, 32, device="meta", dtype=torch.bfloat16))


def _module(config, dtype, gate, up, down, placement=None, backend="torch"):
    module = Experts(config, dtype, placement=placement, backend=backend)
    for name, full in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        for e in range(full.shape[0]):
            module.load_expert(name, e, full[e])
    return module


@pytest.mark.parametrize("tokens", [3, 11])  # 3 x 3 <= 13 experts: few pairs; 11 x 3 > 13: many
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_placement_parts_sum_to_the_whole_layer(tokens, backend):
    config = tiny(hidden_size=40, moe_intermediate_size=24, n_routed_experts=13, num_experts_per_tok=3)
    x, gate, up, down, ids, weights = case(tokens, 40, 24, 13, 3, torch.float32, seed=tokens)
    whole = _module(config, torch.float32, gate, up, down, backend=backend)
    parts = [_module(config, torch.float32, gate, up, down, p, backend) for p in ExpertPlacement.split(13, 3)]
    assert [m.gate_proj.shape[0] for m in parts] == [4, 4, 5]
    ref = reference(x, gate, up, down, ids, weights)
    check(whole(x, ids, weights), ref, torch.float32)
    check(sum(m(x, ids, weights) for m in parts), ref, torch.float32)
    only_first = parts[0](x, ids, weights)  # slots routed elsewhere add exactly nothing
    held = ids < 4
    check(only_first, reference(x, gate, up, down, torch.where(held, ids, 0), weights * held), torch.float32)


def test_placement_and_backend_arguments():
    with pytest.raises(ValueError, match="start/stop"):
        ExpertPlacement(8, 4, 4)
    with pytest.raises(ValueError, match="parts"):
        ExpertPlacement.split(8, 9)
    assert ExpertPlacement.whole(8).holds_all and not ExpertPlacement(8, 0, 4).holds_all
    config = tiny()
    with pytest.raises(ValueError, match="backend"):
        Experts(config, torch.float32, backend="cuda")
    with pytest.raises(ValueError, match="placement covers"):
        Experts(config, torch.float32, placement=ExpertPlacement.whole(config.n_routed_experts + 1))
    module = Experts(config, torch.float32, placement=ExpertPlacement(config.n_routed_experts, 0, 2))
    assert module.load_expert("gate_proj", 5, torch.zeros(module.gate_proj.shape[1:])) is False
    with pytest.raises(ValueError, match="expert must be"):
        module.load_expert("gate_proj", config.n_routed_experts, torch.zeros(module.gate_proj.shape[1:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # grouped_mm, and the dense fallback
def test_moe_decode_at_batch_32_reads_nothing_on_the_host(dtype):
    # Meta tensors have no data: .tolist(), .item(), bool(tensor) or a copy to the host raise. The whole MoE
    # block (router, routed experts with tokens x top-k > experts, shared expert) must run on them, as a
    # decode step of batch 32 must run inside a CUDA graph.
    config = tiny(n_routed_experts=16, num_experts_per_tok=4)
    with torch.device("meta"):
        moe = MoE(config, dtype)
        x = torch.empty(32, 1, config.hidden_size, dtype=dtype)
    assert 32 * config.num_experts_per_tok > config.n_routed_experts
    assert grouped_mm_applies(x[:, 0], moe.experts.gate_proj, moe.experts.down_proj) == (dtype == torch.bfloat16)
    out = moe(x)
    assert out.shape == x.shape and out.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.zeros(3, device="meta").tolist()  # the method's premise: a host read on meta raises


def test_router_math():
    config = tiny(routed_scaling_factor=2.5)
    router = Router(config)
    torch.manual_seed(1)
    router.weight.data.normal_(0, 0.2)
    router.e_score_correction_bias.data = torch.linspace(-0.5, 0.5, config.n_routed_experts)
    x = torch.randn(5, config.hidden_size)
    ids, w = router(x)
    s = torch.sigmoid(x @ router.weight.T)
    want = (s + router.e_score_correction_bias).topk(config.num_experts_per_tok).indices
    assert torch.equal(ids.sort(-1).values, want.sort(-1).values)  # chosen by biased score
    sel = s.gather(1, ids)  # weighted by the unbiased score
    torch.testing.assert_close(w, sel / sel.sum(-1, keepdim=True) * 2.5)


@pytest.mark.gpu
def test_gpu_grouped_path_bf16_equals_float64_loop_and_captures():
    # On a Hopper GPU bf16 takes torch._grouped_mm's sync-free path; odd token count, 37 x 4 pairs > 32
    # experts, three experts without tokens. Same tolerance as on the CPU (bf16 rounding of g, u, h, y).
    x, gate, up, down, ids, weights = case(37, 512, 256, 32, 4, torch.bfloat16, seed=3, skip=(0, 7, 31))
    x, gate, up, down, ids, weights = (t.cuda() for t in (x, gate, up, down, ids, weights))
    assert grouped_mm_applies(x, gate, down)
    ref = reference(*(t.cpu() for t in (x, gate, up, down, ids, weights)))
    y = grouped_experts(x, gate, up, down, ids)
    check(combine(y, weights, torch.bfloat16).cpu(), ref, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
        grouped_experts(x, gate, up, down, ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if anything reads the offsets on the host
        captured = grouped_experts(x, gate, up, down, ids)
    ids.copy_(ids.roll(1, dims=0))  # new routing, same shapes
    graph.replay()
    # same kernels on the same inputs: equal to the bit
    torch.testing.assert_close(captured, grouped_experts(x, gate, up, down, ids), rtol=0, atol=0)
