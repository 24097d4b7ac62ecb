"""GLM's reasoning and tool calls through the live server and the real ``openai`` client: a scripted model
output (the fake engine emits its bytes) comes back as ``reasoning_content``, ``content`` and ``tool_calls``
(arguments as JSON, a non-string value decoded by the tool's schema), streamed and not, alike."""

from __future__ import annotations

import json

import openai
import pytest

from tests.references.fake_serve import MODEL, live_server

SCRIPT = ("<think>Call the tool.</think>Let me check."
          "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
          "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def url():
    with live_server({"reply": lambda prompt: SCRIPT}) as (u, _, _):
        yield u


def extra(obj, name):
    return getattr(obj, name, None) or (obj.model_extra or {}).get(name)


def test_reasoning_and_tool_call(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    out = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200)
    msg = out.choices[0].message
    assert extra(msg, "reasoning_content") == "Call the tool."
    assert msg.content == "Let me check."
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert out.choices[0].finish_reason == "tool_calls"


def test_streamed_reasoning_and_tool_call_match(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    reasoning, content, calls = "", "", {}
    for ch in c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        reasoning += extra(d, "reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
    assert reasoning == "Call the tool."
    assert content == "Let me check."
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}


def test_without_tools_the_call_stays_text(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    out = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
    msg = out.choices[0].message
    assert not msg.tool_calls and "<tool_call>get_weather" in msg.content
