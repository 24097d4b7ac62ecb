"""Expert selection counts (glmtg.cpu.expert_counts) and the --gpu-experts chooser (glmtg.cpu.gpu_experts):
counting on a running model, JSON round trip, another model's file refused, budget fill order."""

from __future__ import annotations

import json

import pytest
import torch

from glmtg.cpu.expert_counts import ExpertCounter, ExpertCounts, model_fingerprint
from glmtg.cpu.gpu_experts import (
    GIB,
    choose_device_experts,
    expert_bytes,
    gpu_budget,
    parse_gpu_experts,
    parse_size,
    with_device_experts,
)
from glmtg.cpu.placement import HostPlacement
from glmtg.layers.moe import Router
from glmtg.loading.presets import random_model
from tests.references.model import new_cache, tiny

CONFIG = tiny(n_routed_experts=7, num_experts_per_tok=3)


def test_counter_counts_every_routers_selections():
    model = random_model(CONFIG, dtype=torch.float32)
    for layer in model.layers[1:]:  # a spread of scores, so the choice depends on the token
        layer.mlp.router.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[torch.Tensor]] = {}  # an independent record of the routers' choices
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o[0].clone()))
             for n, m in model.named_modules() if isinstance(m, Router)]
    counter = ExpertCounter(model, CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    cache = new_cache(CONFIG, 2, 32)
    model(ids, cache)
    cache.lengths += 13
    model(ids[:, :1], cache)  # a decode step counts too
    counts = counter.snapshot()
    counter.close()
    for h in hooks:
        h.remove()
    assert sorted(counts.counts) == [1, 2, 3]
    for layer, row in counts.counts.items():
        chosen = torch.cat([t.reshape(-1) for t in seen[f"layers.{layer}.mlp.router"]])
        assert list(row) == torch.bincount(chosen, minlength=7).tolist()
        assert sum(row) == 2 * 14 * 3 and max(row) < sum(row)  # every token's k choices, not all one expert
    model(ids, new_cache(CONFIG, 2, 32))  # closed: counts no more
    assert counter.snapshot() == counts


def test_counts_round_trip_and_wrong_model(tmp_path):
    counts = ExpertCounts(4, 7, model_fingerprint(CONFIG), {3: range(7), 1: [0, 5, 1, 1, 0, 2, 9], 2: [1] * 7})
    path = tmp_path / "counts.json"
    counts.save(path)
    again = ExpertCounts.load(path, CONFIG)
    assert again == counts and list(again.counts) == [1, 2, 3] and again.selections == 21 + 18 + 7
    other = tiny(n_routed_experts=7, num_experts_per_tok=3, moe_intermediate_size=96)
    assert model_fingerprint(other) != model_fingerprint(CONFIG)
    with pytest.raises(ValueError, match=f"expert counts file {path} holds expert counts of another model"):
        ExpertCounts.load(path, other)
    with pytest.raises(ValueError, match="another model"):
        ExpertCounts.load(path, tiny(n_routed_experts=8, num_experts_per_tok=3))
    data = json.loads(path.read_text())
    for change, match in (({"format": "x"}, "not a glmtg expert counts file"), ({"version": 9}, "version 9"),
                          ({"counts": {"1": [1, 2]}}, "malformed"), ({"counts": {"1": [-1] * 7}}, "malformed")):
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=match):
            ExpertCounts.load(path, CONFIG)
    path.write_text(json.dumps({**data, "counts": {"1": [0] * 7}}))
    with pytest.raises(ValueError, match=r"does not count this model's MoE layers \[1, 2, 3\]"):
        ExpertCounts.load(path, CONFIG)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        ExpertCounts.load(path)
    with pytest.raises(FileNotFoundError, match="expert counts file not found"):
        ExpertCounts.load(tmp_path / "missing.json")


def counts_of(rows: dict[int, list[int]]) -> ExpertCounts:
    return ExpertCounts(4, 5, "x", rows)


def test_chooser_fills_by_counts_with_stable_ties():
    counts = counts_of({1: [5, 9, 0, 9, 1], 2: [9, 2, 2, 7, 0], 3: [3, 3, 3, 3, 3]})
    per_expert = {1: 10, 2: 10, 3: 10}
    # order: (1,1)=9 (1,3)=9 (2,0)=9 | (2,3)=7 | (1,0)=5 | (1,4)... ties by layer, then expert
    assert choose_device_experts(per_expert, 5, 30, counts) == {1: {1, 3}, 2: {0}}
    assert choose_device_experts(per_expert, 5, 49, counts) == {1: {1, 3}, 2: {0, 3}}
    assert choose_device_experts(per_expert, 5, 50, counts) == {1: {0, 1, 3}, 2: {0, 3}}
    assert choose_device_experts(per_expert, 5, 50 + 30, counts) == {1: {0, 1, 3}, 2: {0, 3}, 3: {0, 1, 2}}
    assert choose_device_experts(per_expert, 5, 9, counts) == {}
    assert choose_device_experts(per_expert, 5, 10**9, counts) == {i: set(range(5)) for i in (1, 2, 3)}
    # a layer not on the host is not chosen from, whatever its counts
    assert choose_device_experts({2: 10}, 5, 20, counts) == {2: {0, 3}}


def test_chooser_skips_what_does_not_fit_and_fills_by_layer_without_counts():
    counts = counts_of({1: [5, 9, 0, 9, 1], 2: [9, 2, 2, 7, 0], 3: [0] * 5})
    # layer 2's experts are bigger: its 9 does not fit after layer 1's two, smaller ones still do
    assert choose_device_experts({1: 10, 2: 25}, 5, 40, counts) == {1: {0, 1, 3, 4}}
    assert choose_device_experts({1: 10, 2: 25}, 5, 45, counts) == {1: {1, 3}, 2: {0}}
    # no counts: whole layers in layer order, then the first experts of the next
    assert choose_device_experts({3: 10, 1: 10, 2: 10}, 5, 70, None) == {1: set(range(5)), 2: {0, 1}}
    with pytest.raises(ValueError, match="no counts for layer 4"):
        choose_device_experts({4: 10}, 5, 70, counts)
    with pytest.raises(ValueError, match="budget"):
        choose_device_experts({1: 10}, 5, -1, counts)


def test_with_device_experts_and_bytes():
    host = HostPlacement(frozenset({1, 2, 3}))
    placed = with_device_experts(host, {1: frozenset(range(5)), 3: frozenset({4, 0})}, 5)
    assert placed.layers == {2, 3} and dict(placed.device_experts) == {3: {0, 4}}
    assert placed.device_ids(3) == {0, 4} and placed.device_ids(2) == frozenset()
    with pytest.raises(ValueError, match="layer 4 has no host-placed experts"):
        with_device_experts(host, {4: frozenset({0})}, 5)
    sizes = {f"blk.{i}.ffn_{p}_exps.weight": 7 * (100 + i) for i in (1, 2) for p in ("gate", "up", "down")}
    assert expert_bytes(sizes, [1, 2], 7) == {1: 303, 2: 306}
    with pytest.raises(ValueError, match="no blk.3.ffn_gate_exps.weight"):
        expert_bytes(sizes, [3], 7)


def test_parsing_and_budget():
    assert parse_size("2GiB") == 2 * GIB and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2**20 and parse_size("123") == 123 and parse_size("20kb") == 20_000
    for bad in ("", "GiB", "-1GB", "2XB", "1e9", None):
        with pytest.raises(ValueError, match="--gpu-experts-budget wants a size"):
            parse_size(bad)
    assert parse_gpu_experts("auto") is None and parse_gpu_experts("auto:c.json") == "c.json"
    for bad in ("", "auto:", "yes", "8"):
        with pytest.raises(ValueError, match="--gpu-experts wants auto"):
            parse_gpu_experts(bad)
    # margin max(1 GiB, 5% of the total)
    assert gpu_budget(free=20 * GIB, total=24 * GIB, needed=10 * GIB) == 10 * GIB - int(24 * GIB * 0.05)
    assert gpu_budget(free=10 * GIB, total=10 * GIB, needed=2 * GIB) == 7 * GIB
    assert gpu_budget(free=2 * GIB, total=80 * GIB, needed=2 * GIB) == 0
