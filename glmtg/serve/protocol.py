"""OpenAI request models, their validation, and OpenAI-style error bodies.

Every bad request becomes an ``ApiError`` (HTTP 4xx with ``{"error": {message, type, param, code}}``
naming the parameter), never a 5xx: a server must survive whatever a client sends.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glmtg.serve.sequence import SamplingSpec

MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as an OpenAI-style body with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code, type=self.type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- request models

class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number; unknown fields are ignored (clients send extras)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)  # -1 or absent: drawn at random
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n = 1 is supported")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float | None) -> float | None:
        if value:  # the sampler has no penalties: refusing beats silently ignoring them
            raise ValueError("penalties are not supported (only 0)")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_spec(self) -> SamplingSpec:
        """The engine's spec; OpenAI's defaults (temperature 1, no top-k/min-p) where the request is silent.

        top_p = 0 keeps only the most likely token, i.e. greedy; it is sent as temperature 0 so that no
        sampler ever sees an empty nucleus.
        """
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        top_p = 1.0 if self.top_p is None else float(self.top_p)
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        seed = self.seed if self.seed is not None and self.seed >= 0 else secrets.randbits(63)
        return SamplingSpec(temperature=temperature, top_k=0 if self.top_k is None else max(self.top_k, 0),
                            top_p=top_p, min_p=0.0 if self.min_p is None else float(self.min_p), seed=seed)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt must not be empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            if isinstance(value[0], int) and any(t < 0 for t in value):  # type: ignore[operator]
                raise ValueError("token ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise _FieldError("echo", "echo is not supported")
        if self.logprobs:
            raise _FieldError("logprobs", "logprobs are not supported")
        if self.best_of not in (None, 1):
            raise _FieldError("best_of", "only best_of = 1 is supported")
        if self.suffix:
            raise _FieldError("suffix", "suffix is not supported")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _FieldError("content", f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (plain dicts, text content)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise _FieldError("logprobs", "logprobs are not supported")
        if self.tool_choice is not None and isinstance(self.tool_choice, str) \
                and self.tool_choice not in ("none", "auto", "required"):
            raise _FieldError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or an object")
        return self

    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) wins over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class _FieldError(ValueError):
    """A model-level check that names its field (pydantic would name only the model)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- parsing

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (ApiError 400 otherwise; NaN/Infinity are not JSON)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    return value


def _param(loc: tuple[Any, ...]) -> str:
    # ('messages', 0, 'role') -> "messages[0].role"; pydantic adds union branch names ('str', 'list[int]')
    # and validator tags into loc, which name no parameter
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith(("list[", "dict[", "function-")) or part in
                                        ("str", "int", "float", "bool", "TextPart", "StreamOptions")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[_Strict], data: dict[str, Any]) -> Any:
    """``model`` validated from ``data``; the first problem as ApiError 400 naming the parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # a union reports one error per branch: the deepest one names the parameter most precisely
        err = max(e.errors(include_url=False), key=lambda x: len(_param(tuple(x.get("loc", ())))))
        loc = tuple(err.get("loc", ()))
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            loc = loc + (ctx_error.field,)
            message = str(ctx_error)
        else:
            message = err.get("msg", "invalid value")
            message = message.removeprefix("Value error, ")
        param = _param(loc) or None
        if err.get("type") == "missing":
            message = f"missing required parameter {param!r}"
        else:
            message = f"{param}: {message}" if param else message
        raise bad_request(message, param=param,
                          code="missing_required_parameter" if err.get("type") == "missing" else None) from None
