"""The split server's engine (glmtg.serve.split) on 2 gloo ranks, without HTTP: rank 0 drives an LLMEngine whose
runner broadcasts each step, rank 1 follows on its part of the model; the token ids of concurrent requests
(chunked prefill, a shared prefix from the prefix cache, a seeded sampled request) equal those of the one-process
engine on the whole model, in both split modes, and the follower ran exactly the steps rank 0 ran.

Tolerance: the KV pool is f16 (an engine format): -sm graph's K/V differ from the single model's in their last
float32 bits and can round to neighbouring halves, so its logits agree to ~5e-5 of the largest (measured in
tests/parallel/test_engine_gloo.py; 5e-4 allowed) and its tokens must be equal (no near tie in these random
prompts); -sm layer computes every layer as the single model does: logits bitwise equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glmtg.config import ModelConfig
from glmtg.loading.presets import random_model
from glmtg.parallel import LayerSplitModel, TPGroup, build_tp_model, layer_ranges, load_from_full, load_split_from_full
from glmtg.parallel.launch import rank_cache_config
from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
from glmtg.serve.runner import ModelRunner
from glmtg.serve.sequence import RunnerBatch, SamplingSpec
from glmtg.serve.split import StepBroadcaster, check_runners_agree, control_group, decode, encode, follow
from tests.references.gloo import spawn_ranks

CONFIG = ModelConfig.preset("tiny")
MAX_LEN = 48
PREFIX = [11, 250, 37, 900, 4, 61, 512, 8, 99]  # 9 tokens: two requests share it (prefix cache, pages of 4)
REQUESTS = [
    ("a", PREFIX + [3, 77], SamplingSpec(temperature=0.0), 6),
    ("b", PREFIX + [640, 2, 19, 5], SamplingSpec(temperature=0.0), 5),
    ("c", [301, 7], SamplingSpec(temperature=0.8, top_k=50, seed=1234), 7),
]
# a prefill row and a decode row: two forwards in one step
PROBE = RunnerBatch(token_ids=[[5, 17, 300, 42, 999, 7, 64], [128]], start_positions=[0, 3],
                    block_tables=[[0, 1], [2]], sample=[True, True], specs=[SamplingSpec(0.0)] * 2, steps=[0, 0])
REL_TOL = 5e-4


def _runner(model: torch.nn.Module, config: ModelConfig) -> ModelRunner:
    return ModelRunner(model, config, block_size=4, max_num_seqs=3, max_model_len=MAX_LEN, k_format="f16",
                       device="cpu")


def _engine(runner: ModelRunner) -> LLMEngine:
    # prefill chunks of 5 tokens: prompts span several steps, interleaved with the others' decode rows
    return LLMEngine(runner, SchedulerConfig(max_num_seqs=3, max_prefill_tokens=5, max_model_len=MAX_LEN),
                     eos_token_ids=())


def _drive(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {rid: [] for rid, *_ in REQUESTS}
    for rid, prompt, spec, n in REQUESTS:
        engine.add_request(rid, prompt, spec, n)
    while engine.has_unfinished():
        for event in engine.step():
            if event.token_id is not None:
                out[event.request_id].append(event.token_id)
    return out


def _rank(group: TPGroup) -> None:
    torch.set_num_threads(1)
    control = control_group()
    full = random_model(CONFIG, dtype=torch.float32)
    if group.rank == 0:
        reference = _runner(full, CONFIG)
        want = _drive(_engine(reference))
        want_logits = reference.logits(PROBE)
        assert [len(want[rid]) for rid, *_ in REQUESTS] == [n for *_, n in REQUESTS]
    layers = layer_ranges(CONFIG.num_hidden_layers, [1.0] * group.world_size)[group.rank]
    parts = {
        "graph": (load_from_full(build_tp_model(CONFIG, group, torch.float32), full),
                  rank_cache_config(CONFIG, "graph", group)),
        "layer": (load_split_from_full(LayerSplitModel(CONFIG, group, layers, torch.float32), full),
                  rank_cache_config(CONFIG, "layer", group, layers)),
    }
    for mode, (model, config) in parts.items():
        runner = _runner(model, config)
        check_runners_agree(runner, control)
        if group.rank == 0:
            broadcaster = StepBroadcaster(control)
            runner.before_forward = broadcaster
            got = _drive(_engine(runner))
            assert got == want, f"{mode}: {got} != {want}"
            logits = runner.logits(PROBE)
            if mode == "layer":
                assert torch.equal(logits, want_logits), "layer: probe logits differ"
            else:
                err, scale = (logits - want_logits).abs().max().item(), want_logits.abs().max().item()
                assert err <= REL_TOL * scale, f"graph: max |diff| {err:.3g} vs max |ref| {scale:.3g}"
            broadcaster.stop()
            steps = broadcaster.steps
        else:
            steps = follow(runner, control)
        every = [None] * group.world_size
        dist.all_gather_object(every, steps, group=control)
        assert len(set(every)) == 1 and every[0] > len(REQUESTS), f"{mode}: steps by rank {every}"


def test_split_engine_equals_one_process_in_both_modes() -> None:
    spawn_ranks(_rank, 2)


def test_step_message_round_trip() -> None:
    rows = ([[5, 17, 300], [9], [0]], [0, 12, 47], [[3, 1], [7, 8, 2, 0], [6]])
    flat = encode(*rows)
    assert decode(flat) == (rows[0], rows[1], rows[2])
    assert decode(encode([[4]], [0], [[]])) == ([[4]], [0], [[]])
    try:
        decode(flat + [1])
    except ValueError as e:
        assert "holds" in str(e)
    else:
        raise AssertionError("a message with a trailing value was accepted")
