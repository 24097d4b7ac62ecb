"""route (the sigmoid router in two Triton launches) against a float64 reference and glmtg.layers.moe.Router.

Data. x ~ N(0, 1), W ~ N(0, 1/H) (logits O(1), so the sigmoid is not saturated), bias ~ N(0, 0.5^2) (as large
as the spread of the scores, so it changes which experts win). ``draw`` redraws (next seed) until, in the
float64 reference, (a) the k+1 best choices of every token are more than GAP = 1e-4 apart and (b) the bias
changes the top k of some token. (a): the kernel's fp32 choices are off by ~1e-6 (below), so with a 1e-4
gap its ids must equal the reference's exactly, order included; a near-tie could legitimately flip and
would make the test flaky. (b): a kernel that ignored the bias would then pick other ids and fail.

Tolerance on the weights: |w - ref| <= 1e-5 * scaling. The reference takes the very same x values (fp16
converted exactly) and computes in float64; the kernel's fp32 logits over H <= 200 terms of size ~|x||w|
are off by ~1e-7 (observed; random rounding grows like sqrt(H) * 2^-24 * sum|x w|), the sigmoid has slope
<= 1/4, and the normalization adds a few fp32 roundings. Weights are <= scaling, so 1e-5 * scaling is a
~10x margin, while a wrong expert, biased weights or a missing normalization are off by > 1e-3.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.kernels.router import route
from glmtg.layers.moe import Router

# numpy's, from inside the Triton interpreter (a loop bound passed as a runtime int goes through __index__)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GAP = 1e-4
WEIGHT_TOL = 1e-5  # times scaling; see the module docstring
# Several programs, slices and chunks of 32 columns (one warp lets the chunk go below 128), ragged tails.
SMALL_BLOCKS = dict(block_e=4, block_h=32, split=2, num_warps=1)


def reference(x, weight, bias, top_k, norm_topk_prob, scaling):
    """float64 (ids, weights, choices sorted descending) of the router, on the CPU."""
    scores = torch.sigmoid(x.double().cpu() @ weight.double().cpu().T)
    choice = scores + bias.double().cpu()
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * scaling, scores, choice


def draw(t, e, h, k, dtype, device="cpu", seed=0):
    """(x, weight, bias) with no near-ties among each token's k+1 best choices and a bias that matters."""
    for attempt in range(100):
        g = torch.Generator(device=device).manual_seed(1000 * seed + attempt)
        x = torch.randn(t, h, generator=g, device=device).to(dtype)
        weight = torch.randn(e, h, generator=g, device=device) / math.sqrt(h)
        bias = 0.5 * torch.randn(e, generator=g, device=device)
        _, _, scores, choice = reference(x, weight, bias, k, True, 1.0)
        best = choice.sort(dim=-1, descending=True).values[:, :k + 1]
        gaps_ok = bool((best[:, :-1] - best[:, 1:] > GAP).all())
        bias_matters = any(set(a.tolist()) != set(b.tolist())
                           for a, b in zip(scores.topk(k, dim=-1).indices, choice.topk(k, dim=-1).indices))
        if gaps_ok and (bias_matters or k == e):
            return x, weight, bias
    raise AssertionError("no draw without near-ties in 100 attempts")


def check_against_reference(ids, weights, x, weight, bias, top_k, norm, scaling):
    ref_ids, ref_w, _, _ = reference(x, weight, bias, top_k, norm, scaling)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids), (ids, ref_ids)
    err = (weights.double().cpu() - ref_w).abs().max().item()
    assert err <= WEIGHT_TOL * scaling, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, e, h, k", [(1, 12, 96, 3), (3, 20, 200, 3), (3, 64, 200, 8), (17, 20, 96, 3)])
@pytest.mark.parametrize("norm, scaling", [(True, 1.0), (False, 2.5)])
def test_matches_float64_reference(dtype, t, e, h, k, norm, scaling):
    # T = 17 takes two token blocks of the logits kernel.
    x, weight, bias = draw(t, e, h, k, dtype, seed=t * e + h)
    ids, weights = route(x, weight, bias, top_k=k, norm_topk_prob=norm, scaling=scaling, **SMALL_BLOCKS)
    check_against_reference(ids, weights, x, weight, bias, k, norm, scaling)


@pytest.mark.parametrize("blocks", [{}, dict(block_e=8, block_h=32, split=8), dict(block_e=1, block_h=16, split=1)],
                         ids=["default", "empty-slices", "one-row"])
def test_block_choices(blocks):
    # Defaults (one slice and chunk cover H here), slices past H that must still write their zeros, and
    # one row per program with one slice.
    x, weight, bias = draw(3, 12, 96, 3, torch.float32, seed=5)
    ids, weights = route(x, weight, bias, top_k=3, norm_topk_prob=True, scaling=2.5, **blocks)
    check_against_reference(ids, weights, x, weight, bias, 3, True, 2.5)


def test_all_experts_chosen():
    # top_k == E: every expert, ordered by choice.
    x, weight, bias = draw(3, 12, 96, 12, torch.float32, seed=2)
    ids, weights = route(x, weight, bias, top_k=12, norm_topk_prob=True, scaling=1.0, **SMALL_BLOCKS)
    check_against_reference(ids, weights, x, weight, bias, 12, True, 1.0)


def test_outputs_and_partials_are_all_written(monkeypatch):
    # Every buffer route allocates (outputs and the partial sums) starts poisoned: NaN for floats, -7 for
    # ints. Eight slices of H = 96 leave six slices empty; they must still write zeros.
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    x, weight, bias = draw(3, 20, 96, 3, torch.float16, seed=3)
    monkeypatch.setattr(torch, "empty", poisoned)
    ids, weights = route(x, weight, bias, top_k=3, norm_topk_prob=False, scaling=2.5, block_e=8, block_h=64,
                         split=8)
    monkeypatch.undo()
    assert not weights.isnan().any() and (ids >= 0).all()
    check_against_reference(ids, weights, x, weight, bias, 3, False, 2.5)


def test_ties_go_to_the_lower_expert():
    # Rows 9 and 4 equal, with equal bias: bitwise-equal choices (same arithmetic), lifted above the rest.
    x, weight, bias = draw(2, 12, 96, 3, torch.float32, seed=4)
    weight[9] = weight[4]
    bias[4] = bias[9] = 5.0
    ids, weights = route(x, weight, bias, top_k=3, norm_topk_prob=True, scaling=1.0, **SMALL_BLOCKS)
    assert ids[:, :2].tolist() == [[4, 9], [4, 9]]
    assert torch.equal(weights[:, 0], weights[:, 1])


def _router(e, h, k, norm, scaling, weight, bias):
    config = dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=h, n_routed_experts=e,
                                 num_experts_per_tok=k, norm_topk_prob=norm, routed_scaling_factor=scaling,
                                 n_group=1, topk_group=1)
    router = Router(config).to(weight.device)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
    return router


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm, scaling", [(True, 2.5), (False, 1.0)])
def test_matches_router_module(dtype, norm, scaling):
    x, weight, bias = draw(3, 20, 200, 4, dtype, seed=7)
    ref_ids, ref_w = _router(20, 200, 4, norm, scaling, weight, bias)(x)
    ids, weights = route(x, weight, bias, top_k=4, norm_topk_prob=norm, scaling=scaling, **SMALL_BLOCKS)
    assert torch.equal(ids, ref_ids)
    assert (weights - ref_w).abs().max().item() <= WEIGHT_TOL * scaling


def test_strided_x_and_no_tokens():
    x, weight, bias = draw(3, 12, 96, 3, torch.float32, seed=6)
    wide = torch.randn(3, 2 * 96)
    wide[:, ::2] = x
    ids, weights = route(wide[:, ::2], weight, bias, top_k=3, norm_topk_prob=True, scaling=1.0, **SMALL_BLOCKS)
    check_against_reference(ids, weights, x, weight, bias, 3, True, 1.0)
    ids, weights = route(x[:0], weight, bias, top_k=3, norm_topk_prob=True, scaling=1.0)
    assert ids.shape == (0, 3) and weights.shape == (0, 3)


def _args():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(2, 16, generator=g), weight=torch.randn(12, 16, generator=g),
                bias=torch.randn(12, generator=g), top_k=3, norm_topk_prob=True, scaling=1.0)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(16)), "x must be a 2-D"),
    (dict(x=torch.randn(2, 16, dtype=torch.float64)), "x dtype"),
    (dict(weight=torch.randn(12, 15)), "weight must be a 2-D"),
    (dict(weight=torch.randn(12, 16, dtype=torch.float16)), "weight dtype"),
    (dict(weight=torch.randn(16, 12).T), "weight must be contiguous"),
    (dict(weight=torch.randn(257, 16), bias=torch.randn(257)), "weight must have 1..256"),
    (dict(weight=torch.randn(12, 16, device="meta")), "weight is on"),
    (dict(bias=torch.randn(11)), "bias must be a 1-D"),
    (dict(bias=torch.randn(12, dtype=torch.float16)), "bias dtype"),
    (dict(bias=torch.randn(12, device="meta")), "bias is on"),
    (dict(top_k=0), "top_k must be"),
    (dict(top_k=13), "top_k must be"),
    (dict(top_k=True), "top_k must be"),
    (dict(norm_topk_prob=1), "norm_topk_prob must be"),
    (dict(scaling=0.0), "scaling must be"),
    (dict(scaling=float("nan")), "scaling must be"),
    (dict(block_e=3), "block_e must be a power of two"),
    (dict(split=0), "split must be a power of two"),
])
def test_bad_arguments_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        route(**{**_args(), **change})


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 16])
@pytest.mark.parametrize("e, h", [(128, 4096), (160, 5120)], ids=["air", "glm-4.5"])
def test_gpu_model_shapes_bf16_equal_router(t, e, h):
    # bf16 x, as the model passes it; Router computes F.linear in fp32 (cuBLAS, TF32 off by default for
    # fp32 matmul in torch) so both are fp32 logits over H terms: ~1e-6 apart, far below GAP and the tolerance.
    x, weight, bias = draw(t, e, h, 8, torch.bfloat16, device="cuda", seed=t)
    for norm, scaling in ((True, 1.0), (True, 2.5)):
        ref_ids, ref_w = _router(e, h, 8, norm, scaling, weight, bias)(x)
        ids, weights = route(x, weight, bias, top_k=8, norm_topk_prob=norm, scaling=scaling)
        assert torch.equal(ids, ref_ids)
        assert (weights - ref_w).abs().max().item() <= WEIGHT_TOL * scaling
        check_against_reference(ids, weights, x, weight, bias, 8, norm, scaling)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_x():
    # No host read in the launcher: one captured call replays as x changes and equals an eager call bit for bit.
    x, weight, bias = draw(4, 128, 4096, 8, torch.bfloat16, device="cuda", seed=1)
    x = x.clone()

    def call():
        return route(x, weight, bias, top_k=8, norm_topk_prob=True, scaling=1.0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = call()
    g = torch.Generator(device="cuda").manual_seed(11)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        graph.replay()
        eager_ids, eager_w = call()
        assert torch.equal(ids, eager_ids) and torch.equal(weights, eager_w)
