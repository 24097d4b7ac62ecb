"""The HTTP layer's parts: stop-string matching, histograms, sampling specs, and the hook points
(render_prompt, output parser) as the GLM parser will use them."""

import asyncio
import random
import re
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from glmtg.loading.byte_tokenizer import ByteTokenizer
from glmtg.serve.app import create_app
from glmtg.serve.async_engine import AsyncEngine, EngineDead
from glmtg.serve.metrics import Histogram
from glmtg.serve.protocol import ChatCompletionRequest, validate
from glmtg.serve.sequence import SamplingSpec
from glmtg.serve.stop import StopMatcher
from tests.references.fake_serve import FOREVER, MODEL, REPLY, FakeEngine, live_server


def test_stop_matcher_equals_trimming_the_whole_text():
    rng = random.Random(0)
    alphabet = "abé€ "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(hits)] if hits else text
        m = StopMatcher(stops)
        out, i = "", 0
        while i < len(text) and not m.hit:  # random pieces, as tokens arrive
            n = rng.randint(1, 4)
            out += m.push(text[i:i + n])
            i += n
        out += m.flush()
        assert out == expected, (text, stops)
        assert m.hit == bool(hits)


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["STOP"])
    assert m.push("abcST") == "abc"  # "ST" may begin STOP
    assert m.push("x") == "STx"  # it did not
    assert m.push("STO") == ""
    assert m.push("P!") == "" and m.hit


def test_histogram_buckets_are_cumulative_with_le():
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    lines = h.lines("x")
    assert lines[:3] == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4']
    assert lines[-1] == "x_count 4" and abs(float(lines[-2].split()[1]) - 2.65) < 1e-12


def test_sampling_spec_defaults_and_greedy_top_p_zero():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    spec = validate(ChatCompletionRequest, base).sampling_spec()
    assert (spec.temperature, spec.top_k, spec.top_p, spec.min_p) == (1.0, 0, 1.0, 0.0)
    spec = validate(ChatCompletionRequest, {**base, "top_p": 0, "top_k": -1, "seed": 5}).sampling_spec()
    assert (spec.temperature, spec.top_p, spec.top_k, spec.seed) == (0.0, 1.0, 0, 5)
    r = validate(ChatCompletionRequest, {**base, "max_tokens": 9, "max_completion_tokens": 3})
    assert r.token_limit() == 3


class ScriptParser:
    """A stand-in for glm_output's parser: holds everything, splits it at the end."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, text):
        self.text += text
        return []

    def finish(self):
        m = re.fullmatch(r"<think>(.*)</think>(.*?)<tool_call>(\w+)</tool_call>", self.text, re.DOTALL)
        return [{"reasoning_content": m.group(1)}, {"content": m.group(2)},
                {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                 "function": {"name": m.group(3), "arguments": "{"}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"a": 1}'}}]}]


def test_hooks_render_and_parse():
    seen = []

    def render(tokenizer, request):
        seen.append(request)
        return "PROMPT:" + request.messages[-1].text()

    output = "<think>hmm</think>Let me check.<tool_call>lookup</tool_call>"
    with live_server({"reply": lambda prompt: output}, render_prompt=render,
                     make_parser=lambda request, prompt: ScriptParser()) as (url, engine, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], tools=tools, max_tokens=100)
        assert engine.added[-1][1] == list(b"PROMPT:ab")
        assert seen[-1].tools[0].function.name == "lookup"
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        assert choice.message.model_extra["reasoning_content"] == "hmm"
        call = choice.message.tool_calls[0]
        assert (call.id, call.function.name, call.function.arguments) == ("call_0", "lookup", '{"a": 1}')

        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                                max_tokens=100, stream=True))
        assert [ch.choices[0].finish_reason for ch in chunks][-1] == "tool_calls"
        args = "".join(tc.function.arguments for ch in chunks for tc in (ch.choices[0].delta.tool_calls or []))
        assert args == '{"a": 1}'
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100})
        assert r.json()["choices"][0]["text"] == output  # completions are raw text: no parser


def test_loading_app_answers_503_until_the_engine_is_set():
    app = create_app(None, ByteTokenizer(300), MODEL, max_model_len=64)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert "glmtg_engine_alive 0" in c.get("/metrics").text
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert r.status_code == 400  # bad input is still bad input while loading


def test_async_engine_generate_aborts_on_early_exit_and_refuses_after_shutdown():
    tok = ByteTokenizer(300)
    engine = FakeEngine(tok, step_delay=0.005)
    bridge = AsyncEngine(engine, tok)
    prompt = list(FOREVER.encode())

    async def main():
        got = []
        async for event in bridge.generate("a", prompt, SamplingSpec(seed=1), 200):
            got.append(event.token_id)
            if len(got) == 5:
                break
        assert got == list(REPLY.encode()[:5])
        texts = [d.text async for d in bridge.generate_text("b", list(b"x"), SamplingSpec(seed=2), 100)]
        assert "".join(texts) == REPLY and "\ufffd" not in "".join(texts)
        assert "" in texts  # the first byte of é was held back, not sent as U+FFFD

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.aborted == ["a"]
    bridge.shutdown()

    async def after():
        with pytest.raises(EngineDead):
            await bridge.add("c", prompt, SamplingSpec(), 5)

    asyncio.run(after())
