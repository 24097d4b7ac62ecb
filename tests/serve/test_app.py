"""The HTTP layer against a live uvicorn server and the real openai client (fake engine: scripted bytes).

The fake engine emits one byte token per step, so multi-byte characters (é, €) arrive split over
tokens and every stop string spans several tokens.
"""

import json
import threading
import time

import httpx
import openai
import pytest

from tests.references.fake_serve import FOREVER, MODEL, REPLY, live_server


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def reply_tokens(text: str) -> int:
    return len(text.encode("utf-8"))


def wait_idle(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine kept running after its requests ended"
        time.sleep(0.01)


def test_models(server):
    url, _, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_non_stream(server):
    url, engine, _ = server
    out = client(url).completions.create(model=MODEL, prompt="Say hi", max_tokens=100, temperature=0)
    assert out.choices[0].text == REPLY
    assert out.choices[0].finish_reason == "stop"
    # the EOS token counts as generated but adds no text
    assert out.usage.prompt_tokens == len("Say hi")
    assert out.usage.completion_tokens == reply_tokens(REPLY) + 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    _, ids, spec, max_tokens = engine.added[-1]
    assert ids == list(b"Say hi") and max_tokens == 100 and spec.temperature == 0.0


def test_completion_stream_with_usage(server):
    url, _, _ = server
    stream = client(url).completions.create(model=MODEL, prompt="Say hi", max_tokens=100, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == REPLY
    assert all("\ufffd" not in p for p in pieces)  # no half characters streamed
    assert len(pieces) > 10  # streamed token by token, not in one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply_tokens(REPLY) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_non_stream_and_stream(server):
    url, engine, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=100)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == REPLY
    assert out.choices[0].finish_reason == "stop"
    prompt = "<|system|>\nbe brief<|user|>\nhi<|assistant|>\n"  # ByteTokenizer's template
    assert engine.added[-1][1] == list(prompt.encode())
    assert out.usage.prompt_tokens == len(prompt)

    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=100, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(ch.usage is None for ch in chunks)  # not asked for


def test_max_tokens_ends_with_length(server):
    url, _, _ = server
    out = client(url).completions.create(model=MODEL, prompt="x", max_tokens=5)
    assert out.choices[0].text == REPLY.encode()[:5].decode()
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    # cut inside "é" (bytes 7-8): the end flushes the half character as one U+FFFD, as a full decode would
    out = client(url).completions.create(model=MODEL, prompt="x", max_tokens=7)
    assert out.choices[0].text == "Hello \ufffd"


def test_stop_strings_trimmed_and_request_aborted(server):
    url, engine, _ = server
    c = client(url)
    # FOREVER: the script would run to 200 tokens (0.4 s at the server's 2 ms steps) without the abort
    out = c.completions.create(model=MODEL, prompt=FOREVER, max_tokens=200, stop=["Stop", "zzz"])
    assert out.choices[0].text == REPLY[:REPLY.index("Stop")]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 100
    rid = engine.added[-1][0]
    wait_idle(engine)
    assert rid in engine.aborted  # the engine stopped generating at the stop string

    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                            max_tokens=100, stop="3 €", stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    # GLM's output parser drops whitespace that ends the content (its chat template strips it too)
    assert text == REPLY[:REPLY.index("3 €")].rstrip()
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["stop"]


def test_seed_drawn_when_absent_and_kept_when_given(server):
    url, engine, _ = server
    c = client(url)
    for _ in range(2):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    c.completions.create(model=MODEL, prompt="x", max_tokens=1, seed=1234, top_p=0.5,
                         extra_body={"min_p": 0.25, "top_k": 5})
    (_, _, a, _), (_, _, b, _), (_, _, given, _) = engine.added[-3:]
    assert a.seed != b.seed and 0 <= a.seed < 2**63 and 0 <= b.seed < 2**63
    assert (given.seed, given.top_k, given.top_p, given.min_p) == (1234, 5, 0.5, 0.25)


def test_concurrent_requests_are_not_mixed(server):
    url, _, _ = server
    results = {}

    def ask(i: int) -> None:
        results[i] = client(url).completions.create(model=MODEL, prompt=f"{FOREVER} {i}", max_tokens=20 + i).choices[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(6):
        assert results[i].text == (REPLY.encode() * 2)[:20 + i].decode("utf-8", errors="replace")
        assert results[i].finish_reason == "length"


def test_health_and_metrics(server):
    url, _, _ = server
    c = client(url)
    c.completions.create(model=MODEL, prompt="x", max_tokens=100)
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines["glmtg_requests_running"] == "0" and lines["glmtg_requests_waiting"] == "0"
    assert float(lines["glmtg_kv_cache_usage_ratio"]) == 0.0
    assert int(lines["glmtg_generation_tokens_total"]) >= reply_tokens(REPLY) + 1
    assert int(lines["glmtg_prompt_tokens_total"]) >= 1
    n = int(lines["glmtg_time_to_first_token_seconds_count"])
    assert n >= 1 and lines['glmtg_time_to_first_token_seconds_bucket{le="+Inf"}'] == str(n)
    assert int(lines["glmtg_inter_token_latency_seconds_count"]) >= reply_tokens(REPLY)
    assert "# TYPE glmtg_inter_token_latency_seconds histogram" in text


def test_api_key_guards_all_but_health():
    with live_server(api_key="sekret") as (url, _, _):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        out = client(url, api_key="sekret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert out.choices[0].text == "He"


def test_body_too_large_is_413():
    with live_server(max_body_bytes=2000) as (url, _, _):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a" * 3000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the cap holds while reading
            yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
            for _ in range(40):
                yield b"a" * 100
            yield b'"}'

        r = httpx.post(url + "/v1/completions", content=chunks())
        assert r.status_code == 413
        out = client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert out.choices[0].text == "He"


def test_full_queue_is_503_and_server_recovers():
    # one running request, one waiting; a third finds the queue full
    with live_server({"max_num_seqs": 1, "max_waiting": 1, "step_delay": 0.02}) as (url, engine, _):
        body = {"model": MODEL, "prompt": FOREVER, "max_tokens": 200, "stream": True}
        with httpx.Client(timeout=10) as h, h.stream("POST", url + "/v1/completions", json=body) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next(first_lines)  # the first request runs
            with h.stream("POST", url + "/v1/completions", json=body) as second:
                assert second.status_code == 200  # waiting, accepted
                with pytest.raises(openai.InternalServerError) as e:
                    client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
                assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        wait_idle(engine)  # both streams were closed: both aborted
        out = client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert out.choices[0].text == "He"


@pytest.mark.parametrize("stream", [False, True])
def test_clients_leaving_abort_requests(stream):
    """Non-streaming clients time out; streaming ones read three chunks and hang up."""
    with live_server({"step_delay": 0.01, "max_num_seqs": 4}) as (url, engine, async_engine):
        c = client(url, timeout=0.3)
        left = []

        def ask(i: int) -> None:
            try:
                out = c.completions.create(model=MODEL, prompt=f"{FOREVER} {i}", max_tokens=200, stream=stream)
            except openai.APITimeoutError:
                left.append(i)
                return
            if stream:
                chunks = iter(out)
                for _ in range(3):
                    next(chunks)
                out.close()
                left.append(i)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(left) == list(range(8))
        wait_idle(engine)  # every abandoned request was aborted long before its 200 tokens (2 s)
        added = {a[0] for a in engine.added}
        assert len(added) == 8 and added <= set(engine.aborted)
        assert async_engine.stats()["kv_blocks_used"] == 0
        start = time.monotonic()
        out = client(url).completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert out.choices[0].text == "Hel" and time.monotonic() - start < 1.0


def test_engine_failure_is_503_not_a_hang():
    with live_server({"step_delay": 0.01}) as (url, engine, _):
        waiting = []  # a non-streaming request in flight when the engine fails
        thread = threading.Thread(target=lambda: waiting.append(httpx.post(url + "/v1/completions", timeout=10, json={
            "model": MODEL, "prompt": FOREVER, "max_tokens": 200})))
        thread.start()
        body = {"model": MODEL, "prompt": FOREVER, "max_tokens": 200, "stream": True}
        with httpx.Client(timeout=5) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            engine.fail_on_step = True
            rest = [line for line in lines if line]
        assert "engine_dead" in rest[-1]  # the stream ends with an error event
        thread.join(10)
        assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "engine_dead"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "scripted failure" in health.json()["error"]
        with pytest.raises(openai.InternalServerError) as e:
            client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert "glmtg_engine_alive 0" in httpx.get(url + "/metrics").text


def test_sse_wire_format(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}
