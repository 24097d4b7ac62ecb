"""Routed experts split along their inner width (``experts_split="width"``, glmtg/parallel/experts.py), in one
process (no torch.distributed: a rank's MoE is run without its all-reduce and the ranks' partial sums are
added here): the cut of whole checkpoint tensors, what the safetensors loader is told to read, the refusals,
and the shared expert folded into the routed experts' decode kernel on a width-split rank.

Exactness: cutting rows, float columns or whole GGUF blocks keeps the values bitwise (torch.equal). The summed
partial MoE outputs are the same float32 products added in another order: 1e-5 of the largest output (a few
float32 ulps per op; a lost or doubled partial sum, or a mis-cut block, moves them by > 1e-2 of it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.layers import fused
from glmtg.layers.moe import MoE
from glmtg.loading.presets import random_model
from glmtg.parallel import TPGroup, build_tp_model, load_from_full
from glmtg.parallel.experts import (
    QuantWidthExperts,
    WidthExperts,
    check_experts_split,
    width_experts,
)
from tests.references.gguf_gemm import dequant64, moe_reference
from tests.references.gguf_weights import gguf_weight
from tests.references.quant_tp import CONFIG, mix_formats, random_quant_model

REL_TOL = 1e-5
# every MLP in q4_0, so the shared expert has one routed expert's formats (and, at one shared expert of the
# same width, its shape): the decode kernel may run it as one more slot
FOLDABLE = {"mlp.shared.gate_up.weight": "q4_0", "mlp.shared.down_proj.weight": "q4_0",
            "mlp.experts.down_proj": "q4_0"}


def _partial_sum(models, x: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """The ranks' MoE outputs before the all-reduce, added."""
    return sum(MoE.forward(m.layers[layer].mlp, x) for m in models)


@pytest.mark.parametrize("quant, world", [(False, 2), (False, 4), (True, 2), (True, 3), (True, 4)])
def test_ranks_partial_sums_are_the_whole_moe(quant: bool, world: int) -> None:
    """Both splits, float and GGUF (96 = 3 blocks of 32: 3 ranks one block each, 4 ranks one holding none;
    float 96 columns over 4 ranks: 24 each), list the whole model's slots and sum to its MoE output. (Float
    over 3 ranks: the dense width 224 does not split evenly, which the float TP refuses.)"""
    config = CONFIG if world != 3 else dataclasses.replace(CONFIG, num_key_value_heads=3, num_attention_heads=18)
    full = random_quant_model(config) if quant else random_model(config, dtype=torch.float32)
    formats = mix_formats() if quant else None
    slots = [(s.name, s.shard, s.shape, s.dtype, s.format) for s in full.tensor_slots()]
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(7))
    want = full.layers[1].mlp(x)
    for split in ("width", "expert"):
        parts = [build_tp_model(config, TPGroup(r, world), torch.float32, weight_formats=formats,
                                experts_split=split) for r in range(world)]
        if split == "width":
            assert all([(s.name, s.shard, s.shape, s.dtype, s.format) for s in p.tensor_slots()] == slots
                       for p in parts)
            kind = QuantWidthExperts if quant else WidthExperts
            assert all(isinstance(p.layers[1].mlp.experts, kind) for p in parts)
        got = _partial_sum([load_from_full(p, full) for p in parts], x)
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err <= REL_TOL * scale, (split, world, err, scale)


def test_stack_and_expert_loads_keep_the_same_cut() -> None:
    """A whole stack [E, rows, row] (GGUF files) and one expert at a time (HF / load_from_full) give the same
    part; a float rank's ``kept_expert`` index is that part of one expert's tensor."""
    full = random_quant_model()
    whole = full.layers[1].mlp.experts
    a = build_tp_model(CONFIG, TPGroup(0, 2), torch.float32, weight_formats=mix_formats()).layers[1].mlp.experts
    b = build_tp_model(CONFIG, TPGroup(0, 2), torch.float32, weight_formats=mix_formats()).layers[1].mlp.experts
    for param in ("gate_proj", "up_proj", "down_proj"):
        a.load_expert(param, None, getattr(whole, param))
        for e in range(CONFIG.n_routed_experts):
            b.load_expert(param, e, getattr(whole, param)[e])
        assert torch.equal(getattr(a, param), getattr(b, param))
    ffull = random_model(CONFIG, dtype=torch.float32).layers[1].mlp.experts
    f = build_tp_model(CONFIG, TPGroup(1, 4), torch.float32).layers[1].mlp.experts
    g = build_tp_model(CONFIG, TPGroup(1, 4), torch.float32).layers[1].mlp.experts
    assert f.kept_expert("gate_proj") == (slice(24, 48),) and f.kept_expert("down_proj") == (slice(None), slice(24, 48))
    for param in ("gate_proj", "up_proj", "down_proj"):
        for e in range(CONFIG.n_routed_experts):
            value = getattr(ffull, param)[e]
            f.load_expert(param, e, value)
            g.load_kept_expert(param, e, value[g.kept_expert(param)])
        assert torch.equal(getattr(f, param), getattr(g, param))
    assert torch.equal(f.down_proj, ffull.down_proj[:, :, 24:48])


def test_bad_input_is_refused() -> None:
    experts = build_tp_model(CONFIG, TPGroup(0, 2), torch.float32, weight_formats=mix_formats()).layers[1].mlp.experts
    with pytest.raises(ValueError, match="gate_proj: expected a whole expert"):
        experts.load_expert("gate_proj", 0, experts.gate_proj[0])  # already a part
    with pytest.raises(ValueError, match="param must be one of"):
        experts.load_expert("bias", 0, experts.gate_proj[0])
    with pytest.raises(ValueError, match="experts_split must be one of"):
        build_tp_model(CONFIG, TPGroup(0, 2), torch.float32, experts_split="rows")
    with pytest.raises(ValueError, match="experts_split must be one of"):
        check_experts_split("Width")
    # a float width of fewer columns than ranks (the quantized one holds a zero block instead)
    tiny_width = dataclasses.replace(CONFIG, moe_intermediate_size=2, n_shared_experts=0)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(2\) has fewer columns than the 4 ranks"):
        build_tp_model(tiny_width, TPGroup(3, 4), torch.float32)
    build_tp_model(tiny_width, TPGroup(3, 4), torch.float32, experts_split="expert")


def _kernel_backend(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if getattr(module, "backend", None) == "auto":
            module.backend = "kernel"  # the Triton kernels (the interpreter here), as on a GPU
    return model


@pytest.mark.parametrize("world", [2, 4])
def test_shared_expert_folds_into_a_width_split_ranks_kernel(world: int) -> None:
    """One routed expert's formats and, cut the same way (96 = 3 blocks: 2,1 or 1,1,1,0, the last rank's one
    block of zeros in both), its shape: each rank runs its shared part as one more slot of its decode kernel.
    Per rank, folded equals the separate launches (the same int8 products; the fold sums k + 1 terms in fp32
    and rounds once: 1e-5 of the largest output); the ranks' folded sums equal the whole model's MoE run
    unfused with torch (the int8 rounding of the activations: 32-value groups, the same at every cut since
    cuts fall on 32-value blocks, 1 % of the output's range as tests/models/test_fused_glue.py)."""
    formats = mix_formats(FOLDABLE)
    full = random_quant_model(weight_formats=formats)
    x = torch.randn(1, CONFIG.hidden_size, generator=torch.Generator().manual_seed(8))
    with fused.mode("off"):
        want = full.layers[1].mlp(x)
    total = torch.zeros_like(want)
    with fused.mode("on"):
        for r in range(world):
            model = _kernel_backend(load_from_full(build_tp_model(CONFIG, TPGroup(r, world), torch.float32,
                                                                  weight_formats=formats), full))
            moe = model.layers[1].mlp
            blocks = moe.experts.shared_blocks(x, moe.shared)
            assert blocks is not None, r
            ids, weights = moe.router(x)
            folded = moe.experts(x, ids, weights, shared=blocks)
            separate = moe.shared(x, residual=moe.experts(x, ids, weights))
            scale = separate.abs().max().item()
            assert (folded - separate).abs().max().item() <= REL_TOL * max(scale, 1e-30), r
            if world == 4 and r == 3:  # no block of either width here: the partial sum is exactly 0
                assert not folded.any()
            total += folded
    assert (total - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_shared_expert_of_another_width_is_not_folded() -> None:
    """Two shared experts (192 = 6 blocks, cut 3,3) against the routed experts' 96 (cut 2,1): the shapes
    differ, so shared_blocks declines and the MoE runs the shared expert itself."""
    config = dataclasses.replace(CONFIG, n_shared_experts=2)
    formats = mix_formats(FOLDABLE)
    model = _kernel_backend(build_tp_model(config, TPGroup(0, 2), torch.float32, weight_formats=formats))
    moe = model.layers[1].mlp
    x = torch.randn(1, config.hidden_size)
    with fused.mode("on"):
        assert moe.experts.gate_proj.shape[1] == 64 and moe.shared.down_proj.in_features == 96
        assert moe.experts.shared_blocks(x, moe.shared) is None


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 300])
def test_air_width_cut_runs_the_kernels_on_gpu(tokens: int) -> None:
    """GLM-4.5-Air's experts (H 4096, I 1408 = 44 blocks of q5_0 over 8 ranks: 6 x 4 ranks, 5 x 4, local
    widths 192 and 160; gate/up q4_k; 16 experts, top-8) cut per rank and run by the rank's kernels (decode at
    1 token: mmvq_moe; prefill at 300: the grouped mmq_moe), the 8 partial outputs summed against the float64
    whole. Prefill: within the sum of each rank's bound (tests/references/gguf_gemm.moe_reference on its cut,
    as tests/kernels/gguf/test_mmq_moe.py). Decode rounds x and the intermediate to int8 per 32 values (~1 %
    each, tests/kernels/gguf/test_mmvq_moe.py): 5e-2 of the output's largest value; a mis-cut block or a lost
    partial gives errors of the output's own size."""
    e, k, h, i, world = 16, 8, 4096, 1408, 8
    config = dataclasses.replace(CONFIG, hidden_size=h, moe_intermediate_size=i, n_routed_experts=e,
                                 num_experts_per_tok=k)
    formats = {"gate_proj": "q4_k", "up_proj": "q4_k", "down_proj": "q5_0"}
    whole = {"gate_proj": gguf_weight("q4_k", (e, i), h, 1), "up_proj": gguf_weight("q4_k", (e, i), h, 2),
             "down_proj": gguf_weight("q5_0", (e, h), i, 3)}
    g64, u64, d64 = (dequant64(whole[p], formats[p]) for p in ("gate_proj", "up_proj", "down_proj"))
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(tokens, h, generator=gen) / (float(g64.abs().max()) * h ** 0.5)).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    ref, _ = moe_reference(x, g64, u64, d64, ids, weights, torch.bfloat16)
    total, bound = torch.zeros_like(ref), torch.zeros_like(ref)
    for r in range(world):
        experts = width_experts(config, torch.bfloat16, TPGroup(r, world), formats, "kernel")
        for param, value in whole.items():
            experts.load_expert(param, None, value.cuda())
        cols = experts.cols
        assert cols.stop - cols.start == (192 if r < 4 else 160)
        _, tol = moe_reference(x, g64[:, cols], u64[:, cols], d64[:, :, cols], ids, weights, torch.bfloat16)
        total += experts(x.cuda(), ids.cuda(), weights.cuda()).cpu().double()
        bound += tol
    err = (total - ref).abs()
    if tokens > 1:
        assert bool((err <= bound).all()), float((err - bound).max())
    else:
        assert float(err.max()) <= 5e-2 * float(ref.abs().max())
