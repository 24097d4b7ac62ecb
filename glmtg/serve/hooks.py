"""The two points where the HTTP layer meets GLM's formats, with GLM's implementations as defaults.

- ``render_prompt(tokenizer, request) -> str``: a chat request (ChatCompletionRequest) as prompt text,
  through the model's chat template with the request's tools and ``chat_template_kwargs``
  (``enable_thinking``) (glmtg/serve/chat.py validates the messages and tool calls).
- ``make_parser(request, prompt) -> OutputParser``: one per chat request; ``feed(text)`` takes the next
  piece of generated text and returns OpenAI delta dicts (``{"content": ...}``, ``{"reasoning_content":
  ...}``, ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}``); ``finish()``
  returns what it still held. GLM's ``<think>`` reasoning and ``<tool_call>`` calls
  (glmtg/serve/glm_output.py); whether the output starts inside reasoning is read from the prompt.

Pass others to ``create_app(..., render_prompt=..., make_parser=...)``.
"""

from __future__ import annotations

from typing import Any, Protocol

from glmtg.serve.chat import render_chat, starts_in_reasoning
from glmtg.serve.glm_output import GlmOutputParser


class OutputParser(Protocol):
    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...


def _tools(request: Any) -> list[dict] | None:
    """The request's tools as the template and the parser take them; none when tool_choice is "none"."""
    if not request.tools or request.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in request.tools]


def default_render_prompt(tokenizer: Any, request: Any) -> str:
    """The messages through the tokenizer's chat template, ending with the assistant's turn."""
    kwargs = dict(request.chat_template_kwargs or {})
    enable_thinking = kwargs.pop("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise ValueError(f"chat_template_kwargs.enable_thinking must be a bool, got {enable_thinking!r}")
    if kwargs:
        raise ValueError(f"chat_template_kwargs takes only enable_thinking, got {sorted(kwargs)}")
    text, _ = render_chat(tokenizer, [m.as_dict() for m in request.messages], tools=_tools(request),
                          enable_thinking=enable_thinking)
    return text


def default_make_parser(request: Any, prompt: str) -> OutputParser:
    tools = _tools(request)
    return GlmOutputParser(starts_in_reasoning=starts_in_reasoning(prompt), tools_enabled=bool(tools), tools=tools)
