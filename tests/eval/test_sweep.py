"""sweep-bench on the tiny preset (CPU, fp32): rows at llama-sweep-bench's depths, cache state, JSON."""

import json

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine, EngineConfig
from glmtg.eval.sweep import (
    active_weight_bytes,
    decode_weight_bytes,
    run_label,
    run_sweep,
    sweep_depths,
    write_json,
)
from glmtg.loading.presets import random_model

CFG = ModelConfig.preset("tiny")


def test_sweep_depths_follow_llama_sweep_bench():
    assert sweep_depths(2048, 512, 128) == [0, 512, 1024, 1536]
    assert sweep_depths(1000, 512, 128) == [0]  # a row only where the PP batch still fits
    assert sweep_depths(100, 512, 128) == []
    assert sweep_depths(24, 8, 10) == [0, 8]  # TG longer than ub: its tokens must fit too


def test_run_sweep_rows_and_callback(tmp_path):
    model = random_model(CFG, seed=0, dtype=torch.float32)
    engine = Engine(model, CFG, EngineConfig(ctx_size=24, ubatch=8, attn_backend="sdpa"))
    seen = []
    rows = run_sweep(engine, tg=2, seed=1, on_row=seen.append)
    assert seen == rows and [r.n_kv for r in rows] == [0, 8, 16]
    assert all(r.pp == 8 and r.tg == 2 and r.t_pp > 0 and r.t_tg > 0 for r in rows)
    assert all(r.speed_tg == pytest.approx(2 / r.t_tg) and r.speed_pp == pytest.approx(8 / r.t_pp) for r in rows)
    assert engine.lengths == [0]  # the sweep leaves an empty cache
    path = tmp_path / "r.json"
    write_json(path, rows, {"attn": "sdpa", "ctk": "bf16", "ctv": "q8_0"}, 2)
    doc = json.loads(path.read_text())
    assert [r["n_kv"] for r in doc["rows"]] == [0, 8, 16] and doc["tg"] == 2 and doc["pp"] == 8
    assert run_label(doc["environment"]) == "attn=sdpa kv=bf16/q8_0"
    with pytest.raises(ValueError, match="tg must be >= 1"):
        run_sweep(engine, tg=0)
    with pytest.raises(ValueError, match="ctx_size 24 is smaller than one step"):
        run_sweep(engine, tg=25)


def test_active_weight_bytes_counts_chosen_experts_only():
    # by hand for tiny in 2-byte weights: h=64, q=12*64=768, kv=2*64=128
    h, q, kv = 64, 768, 128
    attention = h * q + 2 * h * kv + q * h
    dense, expert = 3 * h * 128, 3 * h * 32
    weights = h + 1000 * h + 4 * attention + 1 * dense + 3 * (2 + 1) * expert
    router = 3 * h * 8 * 4
    assert active_weight_bytes(CFG, 2) == weights * 2 + router


def test_run_sweep_bandwidth_counts_quantized_weights_as_stored():
    # A Q8_0 model's first parameter is a uint8 block buffer: counting 1 byte per weight (the old estimate)
    # misses the block scales and the fp32 norms; the model's own count is what one token reads.
    model = random_model(CFG, seed=0, dtype=torch.float32, file_type="Q8_0")
    assert next(model.parameters()).dtype == torch.uint8
    expected = model.decode_weight_bytes()
    assert decode_weight_bytes(model, CFG) == expected > active_weight_bytes(CFG, 1)
    engine = Engine(model, CFG, EngineConfig(ctx_size=16, ubatch=8, attn_backend="sdpa"))
    rows = run_sweep(engine, tg=2, seed=1)
    kv = engine.cache.bytes_per_token
    for r in rows:  # tg_gbps = speed x (weights + KV at the mean depth n_kv + (tg + 1) / 2); rel 1e-9: fp rounding
        weights = r.tg_gbps * 1e9 / r.speed_tg - kv * (r.n_kv + 1.5)
        assert weights == pytest.approx(expected, rel=1e-9)


def test_decode_weight_bytes_falls_back_to_the_shape_estimate():
    # a model without its own count: the shape estimate at the first parameter's element size (fp16: 2)
    stand_in = torch.nn.Linear(3, 5, dtype=torch.float16)
    assert decode_weight_bytes(stand_in, CFG) == active_weight_bytes(CFG, 2)
