"""Bad requests get a 4xx with an OpenAI-style body naming the parameter, and the server keeps serving:
each case is followed by a good request through the real openai client."""

import json

import httpx
import openai
import pytest

from tests.references.fake_serve import MAX_MODEL_LEN, MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}


# (id, path, body: dict | bytes, expected status, expected param)
CASES = [
    ("malformed json", CHAT, b'{"model": "glmtg-test", "messages": [', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("json array", COMPLETIONS, b"[1, 2]", 400, None),
    ("NaN literal", COMPLETIONS, b'{"model": "glmtg-test", "prompt": "x", "temperature": NaN}', 400, None),
    ("invalid utf-8", COMPLETIONS, b'{"model": "glmtg-test", "prompt": "\xff\xfe"}', 400, None),
    ("unknown model", CHAT, chat(model="gpt-4"), 400, "model"),
    ("missing model", CHAT, {"messages": USER}, 400, "model"),
    ("model not a string", COMPLETIONS, completion(model=3), 400, "model"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages"),
    ("bad role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("missing role", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("content a number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("user content null", CHAT, chat(messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0].type"),
    ("max_tokens 0", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens a float", COMPLETIONS, completion(max_tokens=2.5), 400, "max_tokens"),
    ("max_tokens a bool", COMPLETIONS, completion(max_tokens=True), 400, "max_tokens"),
    ("max_tokens beyond context", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    ("max_completion_tokens 0", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("prompt beyond context", COMPLETIONS, completion(prompt="a" * MAX_MODEL_LEN), 400, "prompt"),
    ("messages beyond context", CHAT, chat(messages=[{"role": "user", "content": "a" * MAX_MODEL_LEN}]),
     400, "messages"),
    ("empty prompt", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("empty token list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("token id beyond vocab", COMPLETIONS, completion(prompt=[1, 999]), 400, "prompt"),
    ("negative token id", COMPLETIONS, completion(prompt=[1, -1]), 400, "prompt"),
    ("two prompts", COMPLETIONS, completion(prompt=["a", "b"]), 400, "prompt"),
    ("temperature negative", CHAT, chat(temperature=-0.1), 400, "temperature"),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p above 1", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_p negative", COMPLETIONS, completion(top_p=-0.01), 400, "top_p"),
    ("min_p above 1", CHAT, chat(min_p=2), 400, "min_p"),
    ("min_p negative", CHAT, chat(min_p=-1), 400, "min_p"),
    ("top_k a float", CHAT, chat(top_k=2.5), 400, "top_k"),
    ("top_k a string", COMPLETIONS, completion(top_k="5"), 400, "top_k"),
    ("top_k below -1", COMPLETIONS, completion(top_k=-2), 400, "top_k"),
    ("n = 2", CHAT, chat(n=2), 400, "n"),
    ("stream a string", CHAT, chat(stream="yes"), 400, "stream"),
    ("stop numbers", CHAT, chat(stop=[1, 2]), 400, "stop[0]"),
    ("stop empty string", COMPLETIONS, completion(stop=""), 400, "stop"),
    ("too many stops", COMPLETIONS, completion(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("seed a string", CHAT, chat(seed="abc"), 400, "seed"),
    ("seed too large", CHAT, chat(seed=2**64), 400, "seed"),
    ("presence_penalty", CHAT, chat(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty out of range", CHAT, chat(frequency_penalty=5), 400, "frequency_penalty"),
    ("logprobs", CHAT, chat(logprobs=True), 400, "logprobs"),
    ("echo", COMPLETIONS, completion(echo=True), 400, "echo"),
    ("stream_options bad", CHAT, chat(stream=True, stream_options={"include_usage": "x"}), 400,
     "stream_options.include_usage"),
    ("tool without function", CHAT, chat(tools=[{"type": "function"}]), 400, "tools[0].function"),
    ("tool_choice unknown", CHAT, chat(tool_choice="sometimes"), 400, "tool_choice"),
    ("chat_template_kwargs a list", CHAT, chat(chat_template_kwargs=[1]), 400, "chat_template_kwargs"),
    ("enable_thinking not a bool", CHAT, chat(chat_template_kwargs={"enable_thinking": "no"}), 400,
     "chat_template_kwargs"),
    ("unknown template kwarg", CHAT, chat(chat_template_kwargs={"reasoning_effort": 3}), 400, "chat_template_kwargs"),
    ("assistant tool call arguments not JSON", CHAT,
     chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
                    {"role": "user", "content": "again"}]), 400, "messages"),
]


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_then_good_request(server, path, body, status, param):
    url, _, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    out = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2)
    assert out.choices[0].message.content == "He"


def test_openai_client_sees_bad_request_fields(server):
    url, _, _ = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="other", messages=USER)
    assert e.value.param == "model" and e.value.code == "model_not_found"


def test_wrong_method_and_route_are_4xx(server):
    url, _, _ = server
    assert httpx.get(url + CHAT).status_code == 405
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
