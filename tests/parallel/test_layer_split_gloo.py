"""Layer split (-sm layer) on CPU: 2 and 4 processes joined by gloo, each holding a range of layers and its
KV cache, give the single-process logits.

Each rank draws the same seeded random model (random_model, float32), computes the single-process logits,
builds its stage (LayerSplitModel), fills it from the whole model's tensors and runs a prefill and three
decode steps. The activations are handed on unchanged and each layer runs as in the whole model, so the
logits are bitwise equal (tolerance 0): any lost layer, wrong cache layer or wrong hand-over changes them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.loading.presets import random_model
from glmtg.parallel import LayerSplitModel, TPGroup, layer_ranges, load_split_from_full
from tests.references.gloo import prefill_then_decode, spawn_ranks

CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=5, first_k_dense_replace=2)
BATCH, PROMPT, DECODE_STEPS = 2, 6, 3
RATIOS = {2: (1.0, 3.0), 4: (1.0, 1.0, 2.0, 1.0)}


def _run(model, num_layers: int, ids: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Logits of a prefill of ids[:, :PROMPT], then one decode step per later column (fixed tokens)."""
    return prefill_then_decode(model, CONFIG, num_layers, ids[:, :PROMPT + DECODE_STEPS], PROMPT, **kw)


def _worker(group: TPGroup) -> None:
    torch.set_num_threads(1)
    rank, world = group.rank, group.world_size
    full = random_model(CONFIG, dtype=torch.float32)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(3))
    ref = _run(full, CONFIG.num_hidden_layers, ids)
    ref_last = _run(full, CONFIG.num_hidden_layers, ids, last_only=True)
    ranges = layer_ranges(CONFIG.num_hidden_layers, RATIOS[world])
    stage = load_split_from_full(LayerSplitModel(CONFIG, group, ranges[rank], torch.float32), full)
    del full
    assert len(stage.layers) == ranges[rank][1] - ranges[rank][0]
    assert not any(p.is_meta for p in stage.parameters())
    for i, (g, r) in enumerate(zip(_run(stage, stage.num_layers, ids), ref)):
        assert torch.equal(g, r), f"rank {rank}/{world} step {i}: max |diff| {(g - r).abs().max():.3g}"
    for g, r in zip(_run(stage, stage.num_layers, ids, last_only=True), ref_last):
        assert torch.equal(g, r), f"rank {rank}/{world} last_only: max |diff| {(g - r).abs().max():.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_layer_split_matches_single_process(world: int) -> None:
    spawn_ranks(_worker, world)


@pytest.mark.parametrize("layers, ratios, want", [
    (5, (1, 3), [(0, 1), (1, 5)]),  # 1.25 rounds to 1
    (5, (1, 1, 2, 1), [(0, 1), (1, 2), (2, 4), (4, 5)]),
    (4, (1, 0), [(0, 3), (3, 4)]),  # a zero ratio still gets one layer: every rank is a stage
    (92, (1, 1, 1, 1), [(0, 23), (23, 46), (46, 69), (69, 92)]),
])
def test_layer_ranges(layers, ratios, want) -> None:
    assert layer_ranges(layers, ratios) == want


@pytest.mark.parametrize("layers, ratios, match", [(2, (1, 1, 1), "layers"), (4, (), "ratios"),
                                                   (4, (0, 0), "zero"), (4, (1, -1), "ratios")])
def test_layer_ranges_refuses(layers, ratios, match) -> None:
    with pytest.raises(ValueError, match=match):
        layer_ranges(layers, ratios)


def test_stage_holds_only_its_layers() -> None:
    stage = LayerSplitModel(CONFIG, TPGroup(1, 3), (2, 4), torch.float32)
    assert stage.holds("layers.2.attn.qkv.weight") and stage.holds("layers.3.mlp.router.weight")
    assert not stage.holds("layers.1.attn.qkv.weight") and not stage.holds("layers.4.attn_norm.weight")
    assert not stage.holds("embed.weight") and not stage.holds("lm_head.weight")
    assert stage.load_tensor("embed.weight", torch.ones(CONFIG.vocab_size, CONFIG.hidden_size)) is False
