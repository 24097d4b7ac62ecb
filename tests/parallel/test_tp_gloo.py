"""Tensor parallelism (-sm graph) on CPU: 2 and 4 processes joined by gloo give the single-process logits.

Each rank draws the same seeded random model (random_model, float32), computes the single-process logits
itself, builds its part with build_tp_model, fills it with load_from_full (whole tensors through
load_tensor) and runs a prefill and three decode steps over its own KV cache (Hkv/N heads), the routed
experts split along their width or by expert. The tiny preset
is changed to 24 query / 4 KV heads (GQA 6) so that 4 ranks hold one KV head each.

Tolerance: everything is float32; the split model sums the same products in another order (partial sums
of o_proj, down and the experts added by the all-reduce), a few float32 ulps per op. Over 4 layers logits
of magnitude ~0.6 agree to ~3e-7 (measured); 2e-5 of the largest logit (~1e-5 absolute) leaves margin for that, while
one wrong head, a mis-cut shard, a lost bias or a doubled shared expert moves logits by > 1e-3.
The K/V rows are kept in float32 (tests.references.model.Float32Cache): an f16 cache would round K/V
that differ in their last fp32 bits to different halves.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.loading.presets import random_model
from glmtg.parallel import TPGroup, build_tp_model, load_from_full, local_kv_heads
from tests.references.gloo import assert_rank_logits, prefill_then_decode, spawn_ranks

REL_TOL = 2e-5
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_attention_heads=24, num_key_value_heads=4)
BATCH, PROMPT, DECODE_STEPS = 2, 7, 3


def _run(model, config: ModelConfig, kv_heads: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill of ``ids[:, :PROMPT]`` then one decode step per later column of ``ids``."""
    return prefill_then_decode(model, config, config.num_hidden_layers, ids, PROMPT, kv_heads=kv_heads)


def _worker(tp: TPGroup, split: str) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    rank, world = tp.rank, tp.world_size
    full = random_model(CONFIG, dtype=torch.float32)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(1))
    ref = _run(full, CONFIG, CONFIG.num_key_value_heads, ids)
    model = load_from_full(build_tp_model(CONFIG, tp, torch.float32, experts_split=split), full)
    del full
    # the split is real: this rank holds Hkv/N heads' rows and 1/N of the experts (or of each one's width)
    attn = model.layers[0].attn
    assert attn.qkv.weight.shape[0] == (CONFIG.num_attention_heads + 2 * CONFIG.num_key_value_heads) \
        * CONFIG.head_dim // world
    gate = model.layers[1].mlp.experts.gate_proj
    e, inner = CONFIG.n_routed_experts, CONFIG.moe_intermediate_size
    assert tuple(gate.shape[:2]) == ((e // world, inner) if split == "expert" else (e, inner // world))
    got = _run(model, CONFIG, local_kv_heads(CONFIG, tp), ids)
    assert_rank_logits(got, ref, REL_TOL, rank, world)


@pytest.mark.parametrize("split", ["width", "expert"])
@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_single_process(world: int, split: str) -> None:
    spawn_ranks(_worker, world, (split,))


def test_single_rank_is_the_whole_model() -> None:
    """A group of one holds everything and sums nothing: bitwise the single-process model."""
    full = random_model(CONFIG, dtype=torch.float32)
    model = load_from_full(build_tp_model(CONFIG, TPGroup.single(), torch.float32), full)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(2))
    for g, r in zip(_run(model, CONFIG, CONFIG.num_key_value_heads, ids), _run(full, CONFIG, 4, ids)):
        assert torch.equal(g, r)


def test_rank_weights_are_the_whole_models_slices() -> None:
    """Rank r's q rows are query heads [r*Hq/N, (r+1)*Hq/N), its k rows KV heads [r*Hkv/N, ...); o_proj keeps
    the matching input columns, the bias is kept whole; the routed experts are 2 whole experts (by expert) or
    every expert's inner columns [8r, 8r + 8) (width)."""
    full = random_model(CONFIG, dtype=torch.float32)
    d, hq, hkv, n = CONFIG.head_dim, CONFIG.num_attention_heads, CONFIG.num_key_value_heads, 4
    for r in range(n):
        model = load_from_full(build_tp_model(CONFIG, TPGroup(r, n), torch.float32, experts_split="expert"), full)
        whole, part = full.layers[1].attn, model.layers[1].attn
        q, k, v = part.qkv.split(part.qkv.weight.T)
        wq, wk, wv = whole.qkv.split(whole.qkv.weight.T)
        assert torch.equal(q, wq[:, r * hq // n * d:(r + 1) * hq // n * d])
        assert torch.equal(k, wk[:, r * hkv // n * d:(r + 1) * hkv // n * d])
        assert torch.equal(v, wv[:, r * hkv // n * d:(r + 1) * hkv // n * d])
        assert torch.equal(part.o_proj.weight, whole.o_proj.weight[:, r * hq // n * d:(r + 1) * hq // n * d])
        bq, _, _ = part.qkv.split(part.qkv.bias)
        assert torch.equal(bq, whole.qkv.split(whole.qkv.bias)[0][r * hq // n * d:(r + 1) * hq // n * d])
        experts = model.layers[1].mlp.experts
        assert torch.equal(experts.down_proj, full.layers[1].mlp.experts.down_proj[r * 2:(r + 1) * 2])
        wide = load_from_full(build_tp_model(CONFIG, TPGroup(r, n), torch.float32, experts_split="width"), full)
        experts, whole_experts = wide.layers[1].mlp.experts, full.layers[1].mlp.experts
        cols = slice(r * 8, (r + 1) * 8)  # moe_intermediate_size 32 over 4 ranks
        assert torch.equal(experts.down_proj, whole_experts.down_proj[:, :, cols])
        assert torch.equal(experts.gate_proj, whole_experts.gate_proj[:, cols])
        assert torch.equal(experts.up_proj, whole_experts.up_proj[:, cols])


@pytest.mark.parametrize("overrides, world, match", [
    ({}, 3, "num_key_value_heads"),  # 4 KV heads over 3 ranks
    ({"num_key_value_heads": 2, "num_attention_heads": 12, "intermediate_size": 129}, 2, "intermediate_size"),
    ({"n_routed_experts": 2, "num_experts_per_tok": 1}, 4, "n_routed_experts \\(2\\) must be at least"),
])
def test_uneven_split_is_refused(overrides, world, match) -> None:
    config = dataclasses.replace(CONFIG, **overrides)
    with pytest.raises(ValueError, match=match):
        build_tp_model(config, TPGroup(world - 1, world), torch.float32, experts_split="expert")


def test_group_checks_its_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        TPGroup(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        TPGroup(0, 0)
