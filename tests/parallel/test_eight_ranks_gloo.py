"""Eight ranks (the 8-GPU layout of GLM-4.5/4.6) on CPU with gloo: -sm graph with ONE KV head per rank, and
-sm layer with one layer per rank, give the single-process logits.

-sm graph: 96 query / 8 KV heads, as GLM-4.5: each rank holds one KV head and its 12 query heads (the 12/1
case), o_proj's 12 x 64 = 768 columns per rank in whole q5_0 blocks; GGUF blocks in the quant_tp mix, the
routed experts split along their width (the default): the experts' 96 = 3 blocks of 32 over 8 ranks leave
five ranks a zero block, the dense 224 = 7 blocks leave one; the lm_head split by vocabulary rows (1000 / 8).
Tolerance as the 2- and 4-rank graph tests: the same float32 products summed in another order, 2e-5 of the
largest logit. -sm layer: 8 layers, one a rank, bitwise (tolerance 0: the activations are handed on
unchanged).
"""

from __future__ import annotations

import dataclasses

import torch

from glmtg.loading.presets import random_model
from glmtg.parallel import (
    LayerSplitModel,
    TPGroup,
    build_tp_model,
    layer_ranges,
    load_from_full,
    load_split_from_full,
    local_kv_heads,
)
from tests.references.gloo import assert_rank_logits, prefill_then_decode, spawn_ranks
from tests.references.quant_tp import CONFIG as QUANT_CONFIG
from tests.references.quant_tp import mix_formats, random_quant_model

GRAPH_CONFIG = dataclasses.replace(QUANT_CONFIG, num_attention_heads=96, num_key_value_heads=8)
LAYER_CONFIG = dataclasses.replace(QUANT_CONFIG, num_hidden_layers=8, first_k_dense_replace=1)
BATCH, PROMPT, DECODE_STEPS = 2, 5, 2
REL_TOL = 2e-5


def _ids(config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (BATCH, PROMPT + DECODE_STEPS), generator=torch.Generator().manual_seed(4))


def _graph_worker(tp: TPGroup) -> None:
    torch.set_num_threads(1)  # eight processes share the machine's cores
    full = random_quant_model(GRAPH_CONFIG)
    ids = _ids(GRAPH_CONFIG)
    ref = prefill_then_decode(full, GRAPH_CONFIG, GRAPH_CONFIG.num_hidden_layers, ids, PROMPT)
    model = load_from_full(build_tp_model(GRAPH_CONFIG, tp, torch.float32, weight_formats=mix_formats()), full)
    del full
    assert model.layers[0].attn.num_kv_heads == 1 and model.layers[0].attn.num_heads == 12  # the 12/1 case
    got = prefill_then_decode(model, GRAPH_CONFIG, GRAPH_CONFIG.num_hidden_layers, ids, PROMPT,
                              kv_heads=local_kv_heads(GRAPH_CONFIG, tp))
    assert_rank_logits(got, ref, REL_TOL, tp.rank, tp.world_size)


def _layer_worker(group: TPGroup) -> None:
    torch.set_num_threads(1)
    full = random_model(LAYER_CONFIG, dtype=torch.float32)
    ids = _ids(LAYER_CONFIG)
    ref = prefill_then_decode(full, LAYER_CONFIG, LAYER_CONFIG.num_hidden_layers, ids, PROMPT)
    layers = layer_ranges(LAYER_CONFIG.num_hidden_layers, [1.0] * group.world_size)[group.rank]
    assert layers == (group.rank, group.rank + 1)
    stage = load_split_from_full(LayerSplitModel(LAYER_CONFIG, group, layers, torch.float32), full)
    del full
    for i, (g, r) in enumerate(zip(prefill_then_decode(stage, LAYER_CONFIG, stage.num_layers, ids, PROMPT), ref,
                                   strict=True)):
        assert torch.equal(g, r), f"rank {group.rank}/8 step {i}: max |diff| {(g - r).abs().max():.3g}"


def test_graph_split_over_eight_ranks_one_kv_head_each() -> None:
    spawn_ranks(_graph_worker, 8)


def test_layer_split_over_eight_ranks() -> None:
    spawn_ranks(_layer_worker, 8)
