"""LLMEngine over the real ModelRunner (tiny preset, float32 on CPU, f16 K/V): continuous batching, chunked
prefill, prefix caching and preemption give each request the tokens it gets alone.

Greedy decoding: the batched paged runs compute the same float32 math in other shapes, so K/V may round to
a neighbouring f16 value (logits move by ~1e-5, tests/serve/test_runner.py), far below the gap between the
best two tokens of these random-weight steps, so the tokens must be equal. Seeded sampling draws by
(seed, step, token), so a sampled request must also match its alone-run.
"""

from __future__ import annotations

import functools

import torch

from glmtg.loading.presets import preset_config, random_model
from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
from glmtg.serve.runner import ModelRunner
from glmtg.serve.sequence import SamplingSpec
from tests.references.fake_runner import drain

GREEDY = SamplingSpec(temperature=0.0)


@functools.cache
def tiny():
    config = preset_config("tiny")
    return config, random_model(config, dtype=torch.float32, device="cpu")


def engine(max_num_seqs: int = 4, max_prefill_tokens: int = 8, max_model_len: int = 48, block_size: int = 4,
           num_seqs_pool: int | None = None) -> LLMEngine:
    config, model = tiny()
    runner = ModelRunner(model, config, block_size=block_size, max_num_seqs=num_seqs_pool or max_num_seqs,
                         max_model_len=max_model_len, k_format="f16", device="cpu")
    return LLMEngine(runner, SchedulerConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                                             max_model_len=max_model_len), eos_token_ids=())


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]


def alone(prompt: list[int], spec: SamplingSpec, max_tokens: int) -> list[int]:
    e = engine()
    e.add_request("r", prompt, spec, max_tokens)
    return drain(e)["r"]["tokens"]


def test_concurrent_requests_equal_their_alone_runs():
    specs = [GREEDY, SamplingSpec(temperature=0.9, top_k=20, seed=7), GREEDY, SamplingSpec(temperature=1.0, seed=3)]
    ps = prompts([5, 17, 9, 12], seed=1)
    e = engine()
    for i, (p, s) in enumerate(zip(ps, specs)):
        e.add_request(f"q{i}", p, s, max_tokens=6)
    got = drain(e)
    for i, (p, s) in enumerate(zip(ps, specs)):
        assert got[f"q{i}"]["tokens"] == alone(p, s, 6), f"request {i}"
        assert got[f"q{i}"]["reason"] == "length"
    assert e.stats()["kv_blocks_used"] == 0


def test_prefix_cache_reuses_a_chat_history():
    history = prompts([19], seed=2)[0]
    e = engine()
    e.add_request("turn1", history, GREEDY, max_tokens=4)
    first = drain(e)["turn1"]
    follow = history + first["tokens"] + prompts([6], seed=3)[0]
    e.add_request("turn2", follow, GREEDY, max_tokens=5)
    second = drain(e)["turn2"]
    assert second["events"][0].cached_tokens >= 16  # the history's full blocks of 4
    assert second["tokens"] == alone(follow, GREEDY, 5)
    assert e.stats()["prefix_hit_tokens"] >= 16


def test_preemption_on_a_small_pool_keeps_outputs():
    ps = prompts([10, 11, 9], seed=4)
    e = engine(max_num_seqs=3, max_model_len=24, block_size=4, num_seqs_pool=1)  # 6 pages for three requests
    for i, p in enumerate(ps):
        e.add_request(f"p{i}", p, GREEDY, max_tokens=8)
    got = drain(e)
    assert e.stats()["preemptions"] > 0
    for i, p in enumerate(ps):
        assert got[f"p{i}"]["tokens"] == alone(p, GREEDY, 8)
