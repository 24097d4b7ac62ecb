"""OpenAI chat messages (and tools) -> the prompt text, through the model's chat template.

Messages are checked here so that a bad request fails with a ValueError naming the field (the API layer
answers HTTP 400 with it) before any template sees it. They reach the template in the shape GLM's
template expects: content as one string (text parts joined), assistant tool calls with their arguments
as a dict (GLM's template iterates ``arguments.items()``; the OpenAI wire format sends a JSON string).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ASSISTANT_MARK = "<|assistant|>"


def _text(content: Any, where: str) -> str:
    """Content as a string or a list of ``{"type": "text", "text": str}`` parts (joined, as GLM's template
    joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"{where}[{j}] must be a part {{'type': 'text', 'text': ...}} (only text is supported)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function'")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise ValueError(f"{where}.function must be an object")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.function.name must be a non-empty string")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e.msg}") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if "id" in call:
        if not isinstance(call["id"], str):
            raise ValueError(f"{where}.id must be a string")
        out["id"] = call["id"]
    return out


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    out: dict[str, Any] = {"role": role}
    calls = m.get("tool_calls")
    if role == "assistant" and calls is not None:
        if not isinstance(calls, list):
            raise ValueError(f"{where}.tool_calls must be a list")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    elif calls is not None:
        raise ValueError(f"{where}.tool_calls is only allowed on assistant messages")
    content = m.get("content")
    if content is None:
        if role != "assistant" or not out.get("tool_calls"):
            raise ValueError(f"{where}.content is required")
        content = ""  # GLM's template calls content.strip(): a missing content must be an empty string
    out["content"] = _text(content, f"{where}.content")
    for key in ("name", "tool_call_id", "reasoning_content"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise ValueError(f"{where}.{key} must be a string")
            out[key] = m[key]
    return out


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked copies of the messages, in the shape chat templates expect; ValueError naming the field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    return [_message(m, i) for i, m in enumerate(messages)]


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The request's ``tools`` (None or a list of ``{"type": "function", "function": {"name", ...}}``)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters must be an object")
    return tools or None


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def starts_in_reasoning(prompt: str) -> bool:
    """Whether the model's output continues inside an open ``<think>``: after the last ``<|assistant|>`` (the
    turn being generated, where the template has one) a ``<think>`` comes later than any ``</think>``.
    GLM-4.5's own template ends at ``<|assistant|>`` with thinking on (the model writes ``<think>`` itself)
    and at ``<think></think>`` with it off, so for it this is False; templates that open ``<think>`` in
    the prompt make it True."""
    turn = prompt[prompt.rfind(ASSISTANT_MARK) + len(ASSISTANT_MARK):] if ASSISTANT_MARK in prompt else prompt
    return turn.rfind(THINK_OPEN) > turn.rfind(THINK_CLOSE)


def render_chat(tokenizer: Any, messages: Any, *, tools: Any = None, enable_thinking: bool = True,
                add_generation_prompt: bool = True) -> tuple[str, bool]:
    """Validate the messages and tools and render them with ``tokenizer.apply_chat_template``.

    Returns ``(prompt_text, starts_in_reasoning)``: the text to tokenize, and whether the output will start
    inside reasoning (see :func:`starts_in_reasoning`). ``tools`` and ``enable_thinking`` are passed only to a
    template function that takes them: the byte tokenizer of the random-weight presets takes neither and
    renders the messages alone. ValueError (naming the field) for bad messages or tools, and for a template
    that fails on them.
    """
    if not isinstance(enable_thinking, bool):
        raise ValueError(f"enable_thinking must be a bool, got {type(enable_thinking).__name__}")
    checked = validate_messages(messages)
    tool_list = validate_tools(tools)
    apply = tokenizer.apply_chat_template
    kwargs: dict[str, Any] = {}
    if tool_list is not None and _accepts(apply, "tools"):
        kwargs["tools"] = tool_list
    if _accepts(apply, "enable_thinking"):
        kwargs["enable_thinking"] = enable_thinking
    prompt = apply(checked, add_generation_prompt=add_generation_prompt, **kwargs)
    if not isinstance(prompt, str):
        raise ValueError(f"the chat template returned {type(prompt).__name__}, not text")
    return prompt, starts_in_reasoning(prompt)
