"""The Engine runs a rank's model unchanged: 2 gloo processes, in both split modes, generate the tokens and
prefill logits of the single-process engine. Ranks are started with glmtg.parallel.launch.spawn and each
engine is given rank_cache_config's config, so its KV cache has the rank's shape (Hkv/N heads, or its layers).

Tolerance: the caches are f16 (an engine format), so -sm graph's K/V, which differ from the single model's
in their last float32 bits, can round to neighbouring halves: logits agree to ~5e-5 of their largest
(measured; 5e-4 allowed) rather than float32 ulps; greedy tokens must be equal. -sm layer computes every layer
exactly as the single model does: bitwise equal.
"""

from __future__ import annotations

import dataclasses

import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine, EngineConfig
from glmtg.loading.presets import random_model
from glmtg.parallel import (
    LayerSplitModel,
    TPGroup,
    build_tp_model,
    layer_ranges,
    load_from_full,
    load_split_from_full,
)
from glmtg.parallel.launch import rank_cache_config
from tests.references.gloo import spawn_ranks

CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_attention_heads=24, num_key_value_heads=4)
SETTINGS = EngineConfig(ctx_size=32, ubatch=4, k_format="f16", attn_backend="sdpa")
PROMPT = [5, 17, 300, 42, 999, 7, 64, 128, 3]  # 9 tokens: prefill chunks of 4, 4, 1
REL_TOL = 5e-4


def _outputs(engine: Engine) -> tuple[torch.Tensor, list[int]]:
    logits = engine.prefill(PROMPT)
    tokens = engine.generate(PROMPT, 8, stop_on_eos=False).tokens
    return logits, tokens


def _rank(group: TPGroup) -> None:
    torch.set_num_threads(1)
    full = random_model(CONFIG, dtype=torch.float32)
    ref_logits, ref_tokens = _outputs(Engine(full, CONFIG, SETTINGS))

    graph = load_from_full(build_tp_model(CONFIG, group, torch.float32), full)
    logits, tokens = _outputs(Engine(graph, rank_cache_config(CONFIG, "graph", group), SETTINGS))
    err, scale = (logits - ref_logits).abs().max().item(), ref_logits.abs().max().item()
    assert err <= REL_TOL * scale, f"graph rank {group.rank}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"
    assert tokens == ref_tokens, f"graph rank {group.rank}: {tokens} != {ref_tokens}"

    layers = layer_ranges(CONFIG.num_hidden_layers, [1.0] * group.world_size)[group.rank]
    stage = load_split_from_full(LayerSplitModel(CONFIG, group, layers, torch.float32), full)
    logits, tokens = _outputs(Engine(stage, rank_cache_config(CONFIG, "layer", group, layers), SETTINGS))
    assert torch.equal(logits, ref_logits), f"layer rank {group.rank}: logits differ"
    assert tokens == ref_tokens, f"layer rank {group.rank}: {tokens} != {ref_tokens}"


def test_engine_on_two_ranks_in_both_modes() -> None:
    spawn_ranks(_rank, 2)
