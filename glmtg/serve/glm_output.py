"""GLM-4.5/4.6 output -> OpenAI chat deltas: reasoning, content and tool calls, incrementally.

The format (GLM-4.5's chat template and the glm4_moe parsers of vLLM/SGLang agree on it):

* reasoning sits between ``<think>`` and ``</think>``. GLM's template ends the prompt at ``<|assistant|>``
  with thinking on, so the model itself opens ``<think>`` as the first thing it writes; a template that
  already opened ``<think>`` in the prompt makes the output start inside reasoning (``starts_in_reasoning``).
  With ``enable_thinking=false`` the template writes ``<think></think>`` itself and the output is content.
  Only a ``<think>`` at the very start of the output (after whitespace) opens reasoning: later on it is text.
* a tool call is ``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...\\n</tool_call>``,
  several per message possible; recognised only in content and only when the request carried tools.

Whitespace follows the template, which renders ``reasoning.strip()`` and ``content.strip()``: reasoning and
content each lose their leading whitespace, and whitespace is held back until text of the same kind follows
it, so whitespace before ``</think>``, around tool calls (unless content follows) or at the end is dropped. Streaming and non-streaming
therefore give the same text: ``parse_complete`` is ``feed`` + ``finish``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_REASONING = "reasoning_content"
_CONTENT = "content"

# one argument pair; the body of a call must be a sequence of these and nothing else but whitespace
_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


def _held_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Start of the longest suffix of ``text`` that is a proper prefix of one of ``tags`` (len(text) if none):
    those characters may still become a tag, everything before them is certainly text."""
    longest = max((len(t) for t in tags), default=1)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(t.startswith(tail) and t != tail for t in tags):
            return start
    return len(text)


def _schema_types(tools: list[dict] | None) -> dict[str, dict[str, set[str]]]:
    """tool name -> parameter name -> the JSON-schema types the tool declares for it."""
    out: dict[str, dict[str, set[str]]] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        types: dict[str, set[str]] = {}
        for key, prop in props.items() if isinstance(props, dict) else ():
            declared = prop.get("type") if isinstance(prop, dict) else None
            if isinstance(declared, str):
                declared = [declared]
            types[key] = {t for t in declared if isinstance(t, str)} if isinstance(declared, list) else set()
        out[fn["name"]] = types
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity are not JSON: such a value stays a string


def _decode_value(raw: str, types: set[str] | None) -> Any:
    """The argument's value: a string stays a string where the schema says string; where the schema names
    only other types the text is JSON-decoded (kept as text if it does not parse); with no schema for the
    parameter, text that parses as a JSON number, bool, null, object or array is decoded."""
    if types and "string" in types:
        return raw
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw
    if isinstance(value, str) and not types:
        return raw  # a quoted string with no schema: keep exactly what the model wrote
    return value


def _parse_call(body: str, schemas: dict[str, dict[str, set[str]]]) -> tuple[str, dict[str, Any]] | None:
    """``NAME\\n<arg_key>..`` (the text between the call tags) -> (name, arguments), None when malformed."""
    cut = len(body)
    for sep in ("\n", "<arg_key>"):
        if (i := body.find(sep)) != -1:
            cut = min(cut, i)
    name = body[:cut].strip()
    if not name or any(c in name for c in "<>") or len(name.split()) != 1:
        return None
    types = schemas.get(name, {})
    args: dict[str, Any] = {}
    rest, pos = body[cut:], 0
    while rest[pos:].strip():
        m = _ARG.match(rest, pos)
        if m is None:
            return None
        key = m.group(1).strip()
        if not key:
            return None
        args[key] = _decode_value(m.group(2), types.get(key))
        pos = m.end()
    return name, args


class GlmOutputParser:
    """Turns GLM output text, arriving in arbitrary pieces, into OpenAI-style deltas.

    ``feed(text)`` returns the deltas the new text settles: ``{"reasoning_content": str}``, ``{"content": str}``
    or ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}`` (a call
    is emitted whole when its ``</tool_call>`` arrives; arguments are a JSON object string). Text that may
    be the start of a tag is held back (only the shortest piece that could still be one). ``finish()``
    flushes the rest: an unclosed or malformed tool call comes back as content, never as an exception.
    ``tools`` (the request's OpenAI tool list) supplies the parameter types used to decode values.
    """

    def __init__(self, *, starts_in_reasoning: bool, tools_enabled: bool, tools: list[dict] | None = None) -> None:
        self._tools_enabled = tools_enabled
        self._schemas = _schema_types(tools)
        # "start": nothing decided yet (a <think> may still open); "reasoning"; "content"; "call": inside a tool call
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""
        self._seg_start = True  # the current run of reasoning/content has emitted nothing yet
        self._ws = ""           # whitespace held back until text follows it
        self._calls = 0
        self._out: list[dict] = []

    # -- emission ------------------------------------------------------------------------------------
    def _emit(self, kind: str, text: str) -> None:
        if self._seg_start:
            text = text.lstrip()
            if not text:
                return
            self._seg_start = False
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        piece = self._ws + body
        self._ws = text[len(body):]
        if self._out and kind in self._out[-1]:
            self._out[-1][kind] += piece
        else:
            self._out.append({kind: piece})

    def _end_segment(self, keep_ws: bool) -> None:
        # whitespace before a tool call may still separate the content around it; reasoning's never reaches content
        if not keep_ws:
            self._ws = ""
        self._seg_start = True

    def _emit_call(self, raw: str) -> None:
        parsed = _parse_call(raw[len(CALL_OPEN):-len(CALL_CLOSE)], self._schemas)
        if parsed is None:  # malformed: the model's text goes back to the client as it was
            self._emit(_CONTENT, raw)
            return
        name, args = parsed
        call = {"index": self._calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
        self._calls += 1
        self._out.append({"tool_calls": [call]})

    # -- state machine ---------------------------------------------------------------------------------
    def _content_tags(self) -> tuple[str, ...]:
        return (CALL_OPEN,) if self._tools_enabled else ()

    def _step(self, final: bool) -> bool:
        """Consume what the buffer settles; True when the state changed and the loop should run again."""
        buf = self._buf
        if self._state == "start":
            head = buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf, self._state = head[len(THINK_OPEN):], "reasoning"
                self._end_segment(keep_ws=False)
                return True
            if THINK_OPEN.startswith(head) and not final:
                return False  # empty, whitespace or a piece of "<think>": wait for more
            self._state = "content"
            return True
        if self._state == "call":
            end = buf.find(CALL_CLOSE)
            if end == -1:
                if final:
                    self._buf, self._state = "", "content"
                    self._emit(_CONTENT, buf)
                return False
            self._buf, self._state = buf[end + len(CALL_CLOSE):], "content"
            self._emit_call(buf[:end + len(CALL_CLOSE)])
            return True
        kind, tag = (_REASONING, THINK_CLOSE) if self._state == "reasoning" else (_CONTENT, CALL_OPEN)
        if self._state == "reasoning" or self._tools_enabled:
            at = buf.find(tag)
            if at != -1:
                self._emit(kind, buf[:at])
                self._end_segment(keep_ws=kind == _CONTENT)
                self._buf = buf[at + len(tag):] if self._state == "reasoning" else buf[at:]
                self._state = "content" if self._state == "reasoning" else "call"
                return True
        keep = len(buf) if final else _held_suffix(buf, (tag,) if self._state == "reasoning" else self._content_tags())
        self._emit(kind, buf[:keep])
        self._buf = buf[keep:]
        return False

    def feed(self, text: str) -> list[dict]:
        """Add the next piece of output; returns the deltas it settles (possibly none)."""
        self._buf += text
        while self._step(final=False):
            pass
        out, self._out = self._out, []
        return out

    def finish(self) -> list[dict]:
        """The output has ended: flush what was held back (an unclosed tool call becomes content)."""
        while self._step(final=True):
            pass
        self._ws = ""  # trailing whitespace of the message is dropped, as the template strips it
        out, self._out = self._out, []
        return out


def parse_complete(text: str, *, starts_in_reasoning: bool, tools_enabled: bool, tools: list[dict] | None = None
                   ) -> tuple[str | None, str | None, list[dict]]:
    """The whole output at once -> (reasoning or None, content or None, tool calls as OpenAI's
    non-streamed ``message.tool_calls``: ``{"id", "type", "function"}``). Same parser as streaming."""
    parser = GlmOutputParser(starts_in_reasoning=starts_in_reasoning, tools_enabled=tools_enabled, tools=tools)
    reasoning, content, calls = [], [], []
    for delta in parser.feed(text) + parser.finish():
        reasoning.append(delta.get(_REASONING, ""))
        content.append(delta.get(_CONTENT, ""))
        calls += [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
    return "".join(reasoning) or None, "".join(content) or None, calls
