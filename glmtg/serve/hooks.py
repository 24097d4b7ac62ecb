"""HOOK POINTS between the HTTP layer and GLM's formats, with plain defaults.

The app calls two things it does not own:

- ``render_prompt(tokenizer, request) -> str``: a chat request (ChatCompletionRequest) as prompt text.
  Default: the tokenizer's chat template over the messages (tools and chat_template_kwargs passed on when
  the request has them). GLM's version (glmtg/serve/chat.py: tools, ``enable_thinking``) replaces it.
- ``make_parser(request) -> OutputParser``: one per chat request; ``feed(text)`` takes the next piece of
  generated text and returns OpenAI delta dicts (``{"content": ...}``, ``{"reasoning_content": ...}``,
  ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}``); ``finish()``
  returns what it still held. Default: everything is content. GLM's version (glmtg/serve/glm_output.py:
  ``<think>`` and ``<tool_call>``) replaces it.

Pass others to ``create_app(..., render_prompt=..., make_parser=...)``.
"""

from __future__ import annotations

from typing import Any, Protocol


class OutputParser(Protocol):
    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...


class ContentParser:
    """The default parser: generated text is all ``content``."""

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return []


def default_make_parser(request: Any) -> OutputParser:
    return ContentParser()


def default_render_prompt(tokenizer: Any, request: Any) -> str:
    """The request's messages through the tokenizer's chat template, ending with the assistant's turn."""
    messages = [m.as_dict() for m in request.messages]
    extra: dict[str, Any] = dict(request.chat_template_kwargs or {})
    if request.tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
