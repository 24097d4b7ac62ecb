"""The server over the real engine: a tiny random-weight GLM4-MoE (float32, CPU) behind a live uvicorn server,
driven by the real ``openai`` client.

Greedy outputs are compared as text: a request gives the same tokens alone and beside others (the runner
and engine tests show the batched paged math equals the alone-run to ~1e-5 in the logits, far below these
random models' gaps between the best two tokens), so equal text means nothing was lost or mixed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import re
import time

import httpx
import openai
import pytest
import torch

from glmtg.loading.presets import preset_config, preset_tokenizer, random_model
from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
from glmtg.serve.runner import ModelRunner
from tests.references.fake_serve import MODEL, live_server

MAX_LEN = 160


@functools.cache
def tiny():
    config = preset_config("tiny")
    return config, random_model(config, dtype=torch.float32, device="cpu")


def real_engine(parallel: int = 4) -> LLMEngine:
    config, model = tiny()
    runner = ModelRunner(model, config, block_size=8, max_num_seqs=parallel, max_model_len=MAX_LEN, k_format="f16",
                         device="cpu")
    return LLMEngine(runner, SchedulerConfig(max_num_seqs=parallel, max_prefill_tokens=16, max_model_len=MAX_LEN,
                                             max_waiting=64), eos_token_ids=())


def serve(parallel: int = 4):
    config, _ = tiny()
    return live_server(engine=real_engine(parallel), tokenizer=preset_tokenizer(config), max_model_len=MAX_LEN)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, **kwargs)


def complete(url: str, prompt: str, max_tokens: int = 8) -> tuple[str, int]:
    out = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    details = out.usage.prompt_tokens_details
    return out.choices[0].text, (details.cached_tokens if details else 0) or 0


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


PROMPTS = [f"request {i}: " + "abcdefghij"[i % 10] * (3 + 5 * i) for i in range(12)]


def test_concurrent_requests_equal_alone_runs_and_nothing_is_lost():
    with serve(parallel=1) as (url, _, _):
        alone = [complete(url, p)[0] for p in PROMPTS]
    with serve(parallel=4) as (url, _, _):
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: complete(url, p)[0], PROMPTS))
        assert together == alone
        assert metric(url, "glmtg_kv_cache_blocks_used") == 0


def test_chat_stream_equals_non_stream():
    with serve() as (url, _, _):
        messages = [{"role": "user", "content": "hello there"}]
        whole = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        chunks = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for ch in chunks:
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
            usage = ch.usage or usage
        assert "".join(parts) == whole.choices[0].message.content
        assert usage.completion_tokens == whole.usage.completion_tokens == 10


def test_follow_up_turn_reuses_the_prefix():
    history = "system: you are terse.\n" + "user: " + "tell me about pages " * 4
    with serve() as (url, _, _):
        first, _ = complete(url, history, max_tokens=6)
        follow = history + first + "\nuser: and then?"
        got, cached = complete(url, follow)
        assert cached >= 8 * ((len(history.encode()) - 1) // 8) - 8  # the history's full pages, less one
        assert metric(url, "glmtg_prefix_cache_hit_tokens_total") >= cached > 0
    with serve() as (url, _, _):
        assert complete(url, follow)[0] == got  # the same continuation without the cache


def test_abandoned_requests_free_their_pages_and_the_server_stays_prompt():
    with serve() as (url, _, _):
        impatient = client(url, timeout=0.05)
        for i in range(6):
            with pytest.raises(openai.APITimeoutError):
                impatient.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=120, temperature=0)
        deadline = time.monotonic() + 10
        while metric(url, "glmtg_kv_cache_blocks_used") > 0 or metric(url, "glmtg_requests_running") > 0:
            assert time.monotonic() < deadline, "abandoned requests kept their pages"
            time.sleep(0.05)
        start = time.monotonic()
        text, _ = complete(url, PROMPTS[0], max_tokens=4)
        assert time.monotonic() - start < 5 and text
