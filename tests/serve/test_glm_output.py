"""GlmOutputParser: every way of cutting an output into pieces gives the deltas parse_complete gives."""

import json
import random

import pytest

from glmtg.serve.glm_output import GlmOutputParser, parse_complete

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
    "units": {"type": ["object", "null"]}}}}}]

TWO_CALLS = ("<think>need weather</think>\nChecking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
             "<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
             "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value> Paris, FR </arg_value>\n<arg_key>zip"
             "</arg_key>\n<arg_value>75001</arg_value>\n<arg_key>units</arg_key>\n<arg_value>{\"t\": \"C\"}</arg_value>"
             "\n</tool_call>\n")
NO_SCHEMA = ("<tool_call>other<arg_key>n</arg_key><arg_value>-1.5e3</arg_value><arg_key>b</arg_key><arg_value>true"
             "</arg_value><arg_key>z</arg_key><arg_value>null</arg_value><arg_key>l</arg_key><arg_value>[1, \"x\"]"
             "</arg_value><arg_key>s</arg_key><arg_value>\"quoted\"</arg_value><arg_key>w</arg_key><arg_value>NaN"
             "</arg_value><arg_key>t</arg_key><arg_value>plain text</arg_value></tool_call>")
BAD_DAYS = "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>three</arg_value>\n</tool_call>"
MALFORMED = ("<tool_call>get weather\n</tool_call>then <tool_call>f junk<arg_key>k</arg_key></tool_call>"
             "<tool_call>\n</tool_call>")

# (name, output text, starts_in_reasoning, tools_enabled, expected (reasoning, content, [(name, args)]))
CASES = [
    ("reasoning then content", "<think>\nLet me see: 2 < 3.\n</think>\nThe answer is <b>4</b>.\n", False, False,
     ("Let me see: 2 < 3.", "The answer is <b>4</b>.", [])),
    ("starts inside reasoning", "I think </thin k> so.</think>\n\nDone", True, False,
     ("I think </thin k> so.", "Done", [])),
    ("thinking off: all content", "Hello <think> is just text here", False, False,
     (None, "Hello <think> is just text here", [])),
    ("unclosed reasoning stays reasoning", "<think>cut off by max_tok", False, False, ("cut off by max_tok", None, [])),
    ("several tool calls", TWO_CALLS, False, True,
     ("need weather", "Checking.", [("get_weather", {"city": "Beijing", "days": 3}),
                                    ("get_weather", {"city": " Paris, FR ", "zip": "75001", "units": {"t": "C"}})])),
    ("no schema: JSON values decoded, strings kept", NO_SCHEMA, False, True,
     (None, None, [("other", {"n": -1500.0, "b": True, "z": None, "l": [1, "x"], "s": "\"quoted\"", "w": "NaN",
                              "t": "plain text"})])),
    ("schema integer that does not parse stays text", BAD_DAYS, False, True,
     (None, None, [("get_weather", {"days": "three"})])),
    ("content around calls keeps one separator", "a <tool_call>f\n</tool_call>\n b", False, True,
     (None, "a b", [("f", {})])),
    ("tools off: call text is content", "x <tool_call>f\n</tool_call>", False, False,
     (None, "x <tool_call>f\n</tool_call>", [])),
    ("unclosed call comes back as content", "ok <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_val", False,
     True, (None, "ok <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_val", [])),
    ("malformed call comes back as content", MALFORMED, False, True, (None, MALFORMED, [])),
    ("partial tags at the end are text", "<think>r</thi", False, True, ("r</thi", None, [])),
    ("partial call tag at the end is text", "see <tool_ca", False, True, (None, "see <tool_ca", [])),
    ("lone partial think at start", " <thi", False, False, (None, "<thi", [])),
    ("empty output", "", False, True, (None, None, [])),
    ("empty reasoning", "<think></think>\n\nhi", False, False, (None, "hi", [])),
]


def _run(pieces, starts_in_reasoning, tools_enabled):
    """Feed the pieces one by one; returns (reasoning, content, calls) joined from the deltas, and the deltas."""
    parser = GlmOutputParser(starts_in_reasoning=starts_in_reasoning, tools_enabled=tools_enabled, tools=TOOLS)
    deltas = []
    for p in pieces:
        deltas += parser.feed(p)
    deltas += parser.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    return (reasoning or None, content or None, calls), deltas


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parse_complete(case):
    _, text, sir, tools_on, (reasoning, content, calls) = case
    got = parse_complete(text, starts_in_reasoning=sir, tools_enabled=tools_on, tools=TOOLS)
    assert got[:2] == (reasoning, content)
    assert _calls(got[2]) == calls
    for c in got[2]:
        assert c["type"] == "function" and c["id"].startswith("call_") and "index" not in c
        assert isinstance(c["function"]["arguments"], str)
    assert len({c["id"] for c in got[2]}) == len(got[2])


def _splits(text, rng):
    yield [text]
    yield list(text)  # every character its own piece: every tag split at every point
    for cut in range(len(text) + 1):  # every single split point
        yield [text[:cut], text[cut:]]
    for _ in range(20):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(0, 7)  # empty pieces too: feed("") must be harmless
            pieces.append(text[i:i + n])
            i += n
        yield pieces


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streaming_matches_complete(case):
    _, text, sir, tools_on, expected = case
    rng = random.Random(1234)
    for pieces in _splits(text, rng):
        (reasoning, content, calls), deltas = _run(pieces, sir, tools_on)
        assert (reasoning, content) == expected[:2], pieces
        assert _calls(calls) == expected[2], pieces
        assert [c["index"] for c in calls] == list(range(len(calls)))
        for d in deltas:  # one key per delta, never an empty piece
            assert len(d) == 1
            assert all(v for v in d.values())


def test_holds_back_only_a_possible_tag():
    p = GlmOutputParser(starts_in_reasoning=False, tools_enabled=True)
    assert p.feed("Hi <tool") == [{"content": "Hi"}]  # " <tool" may open a call: held (the space with it)
    assert p.feed("box> and <") == [{"content": " <toolbox> and"}]
    assert p.feed("tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>") == []
    out = p.feed("</tool_call>")
    assert len(out) == 1 and out[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert p.finish() == []


def test_reasoning_streams_before_it_closes():
    p = GlmOutputParser(starts_in_reasoning=True, tools_enabled=False)
    assert p.feed("step one, ") == [{"reasoning_content": "step one,"}]
    assert p.feed("step two</") == [{"reasoning_content": " step two"}]
    assert p.feed("think>answer") == [{"content": "answer"}]
    assert p.finish() == []


def test_non_ascii_arguments_round_trip():
    text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京 \"x\"\n</arg_value></tool_call>"
    _, _, calls = parse_complete(text, starts_in_reasoning=False, tools_enabled=True, tools=TOOLS)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京 \"x\"\n"}
