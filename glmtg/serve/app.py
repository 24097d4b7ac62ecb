"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics.

Handlers read the body themselves (size cap, JSON, strict validation -> 400/413 naming the parameter),
add the request to the AsyncEngine (full queue -> 503) and then answer at once or as server-sent events.
A handler whose client goes away, or whose output hits a stop string, aborts its request so the engine
frees its pages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmtg.serve.async_engine import AsyncEngine, EngineDead
from glmtg.serve.hooks import OutputParser, default_make_parser, default_render_prompt
from glmtg.serve.llm_engine import QueueFull
from glmtg.serve.metrics import CONTENT_TYPE, Metrics
from glmtg.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    error_body,
    parse_json,
    validate,
)
from glmtg.serve.stop import StopMatcher

UNAUTHENTICATED = ("/health",)


def create_app(async_engine: AsyncEngine | None, tokenizer: Any, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, max_model_len: int = 4096, *,
               render_prompt: Callable[[Any, ChatCompletionRequest], str] = default_render_prompt,
               make_parser: Callable[[ChatCompletionRequest, str], OutputParser] = default_make_parser) -> FastAPI:
    """The app serving ``async_engine`` as ``model_name``.

    ``async_engine`` None means still loading (/health 503, generation 503) until ``app.state.engine``
    is set. ``render_prompt``/``make_parser``: the hook points of glmtg.serve.hooks.
    """
    if max_body_bytes < 1 or max_model_len < 2:
        raise ValueError("max_body_bytes must be >= 1 and max_model_len >= 2")
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if app.state.engine is not None:  # the engine thread stops with the server
            await asyncio.to_thread(app.state.engine.shutdown)

    app = FastAPI(title="glmtg", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = Metrics()
    server = _Server(app, tokenizer, model_name, max_body_bytes, max_model_len, render_prompt, make_parser)
    app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        app.state.metrics.requests_rejected += 1
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:  # a defect, still an OpenAI body
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not engine.alive:
            return JSONResponse({"status": "error", "error": str(engine.dead or "shut down")}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = app.state.engine
        stats = engine.stats() if engine is not None else {}
        alive = engine is not None and engine.alive
        return Response(app.state.metrics.render(stats, alive), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": server.created, "owned_by": "glmtg",
             "max_model_len": max_model_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    return app


class _ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health (401 with an OpenAI-style body)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.api_key is None or scope.get("path") in UNAUTHENTICATED:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if hmac.compare_digest(token.encode(), self.api_key.encode()):
            return await self.app(scope, receive, send)
        message = "missing API key (Authorization: Bearer KEY)" if not given else "incorrect API key"
        response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)
        await response(scope, receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events that always watch for the client leaving, and close their generator (which
    aborts the request) however the response ends."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


@dataclass
class _Step:
    deltas: list[dict[str, Any]]  # parsed output pieces (completions: [{"content": text}])
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Server:
    """The handlers' shared state and logic."""

    def __init__(self, app: FastAPI, tokenizer: Any, model_name: str, max_body_bytes: int, max_model_len: int,
                 render_prompt: Callable, make_parser: Callable) -> None:
        self.app = app
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.max_model_len = max_model_len
        self.render_prompt = render_prompt
        self.make_parser = make_parser
        self.created = int(time.time())

    @property
    def metrics(self) -> Metrics:
        return self.app.state.metrics

    # ------------------------------------------------------------ request intake

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:  # chunked bodies have no length up front
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")

    async def _parse(self, request: Request, model: type) -> Any:
        parsed = validate(model, parse_json(await self._body(request)))
        if parsed.model != self.model_name:
            raise bad_request(f"unknown model {parsed.model!r}; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        return parsed

    def _engine(self) -> AsyncEngine:
        engine = self.app.state.engine
        if engine is None:
            raise ApiError(503, "the model is still loading", type="server_error", code="loading")
        if not engine.alive:
            raise ApiError(503, f"the engine is not running: {engine.dead}", type="server_error",
                           code="engine_dead")
        return engine

    def _token_budget(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> int:
        n = len(prompt_ids)
        if n == 0:
            raise bad_request("the prompt is empty after tokenization", param=prompt_param)
        if n >= self.max_model_len:
            raise bad_request(f"the prompt has {n} tokens; the context holds {self.max_model_len} (with room for "
                              f"at least one generated token)", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise bad_request(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceed the context of "
                              f"{self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    async def _add(self, engine: AsyncEngine, request_id: str, prompt_ids: list[int], parsed: Any,
                   max_tokens: int) -> asyncio.Queue:
        try:
            return await engine.add(request_id, prompt_ids, parsed.sampling_spec(), max_tokens)
        except EngineDead as e:
            raise ApiError(503, str(e), type="server_error", code="engine_dead") from None
        except ValueError as e:  # the engine's own checks (the app's run first, so this is a safety net)
            raise bad_request(str(e)) from None
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e or 'the request queue is full'}",
                           type="server_error", code="queue_full") from None

    # ------------------------------------------------------------ generation

    async def _steps(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue, stops: list[str],
                     parser: OutputParser | None, start: float) -> AsyncIterator[_Step]:
        """Parsed output steps of one request; aborts it when closed early or a stop string hits."""
        matcher = StopMatcher(stops)
        deltas = engine.stream_text(request_id, queue)
        last_time: float | None = None
        prompt_tokens = 0
        reason: str | None = None
        try:
            async for d in deltas:
                prompt_tokens = d.prompt_tokens
                last_time = self.metrics.observe_tokens(d.times, start, last_time)
                text = matcher.push(d.text)
                finished = matcher.hit or d.finished
                if finished:
                    reason = "stop" if matcher.hit else d.finish_reason
                    text += matcher.flush()
                out: list[dict[str, Any]] = []
                if text:
                    out = parser.feed(text) if parser is not None else [{"content": text}]
                if finished and parser is not None:
                    out += parser.finish()
                usage = {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                         "total_tokens": d.prompt_tokens + d.completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}
                yield _Step(out, reason if finished else None, usage)
                if finished:
                    return
        finally:
            await deltas.aclose()  # aborts the request unless it finished
            self.metrics.finished(reason or "abort", prompt_tokens)

    async def _until_disconnect(self, request: Request, work: Any) -> Any:
        """Await ``work`` unless the client leaves first (then cancel it, which aborts the request)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return None
        try:
            return task.result()
        except EngineDead as e:  # the engine failed mid-request: the server cannot answer it
            raise ApiError(503, str(e), type="server_error", code="engine_dead") from None

    # ------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        start = time.monotonic()
        parsed: CompletionRequest = await self._parse(request, CompletionRequest)
        engine = self._engine()
        prompt = parsed.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = getattr(self.tokenizer, "vocab_size", None)
            if vocab is not None and any(t >= vocab for t in prompt):  # type: ignore[operator]
                raise bad_request(f"token ids must be below the vocabulary size {vocab}", param="prompt")
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            ids = self.tokenizer.encode(prompt[0] if isinstance(prompt, list) else prompt)
        max_tokens = self._token_budget(ids, parsed.max_tokens, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        queue = await self._add(engine, request_id, ids, parsed, max_tokens)
        steps = self._steps(engine, request_id, queue, parsed.stop_strings(), None, start)
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(text: str, reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if not parsed.stream:
            async def collect() -> JSONResponse:
                text, reason, usage = "", None, {}
                async for step in steps:
                    text += "".join(d.get("content", "") for d in step.deltas)
                    reason, usage = step.finish_reason, step.usage
                return JSONResponse({**base, "choices": [choice(text, reason)], "usage": usage})

            return await self._until_disconnect(request, collect()) or Response(status_code=499)

        async def chunks() -> AsyncIterator[str]:
            usage: dict[str, Any] = {}
            async for step in steps:
                text = "".join(d.get("content", "") for d in step.deltas)
                usage = step.usage
                if text or step.finish_reason:
                    yield _sse({**base, "choices": [choice(text, step.finish_reason)], "usage": None})
            if parsed.include_usage():
                yield _sse({**base, "choices": [], "usage": usage})

        return _event_stream(chunks(), steps)

    async def chat(self, request: Request) -> Response:
        start = time.monotonic()
        parsed: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        engine = self._engine()
        try:
            text = self.render_prompt(self.tokenizer, parsed)
        except (ValueError, TypeError) as e:  # the messages, tools or kwargs were refused, or the template failed
            field = re.match(r"[a-z_]+", str(e))
            param = field.group(0) if field and field.group(0) in ("tools", "chat_template_kwargs") else "messages"
            raise bad_request(f"the chat template cannot render this request: {e}", param=param) from None
        ids = self.tokenizer.encode(text)
        limit = parsed.token_limit()
        max_tokens = self._token_budget(ids, limit, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        parser = self.make_parser(parsed, text)  # before the add: nothing may fail between add and streaming
        queue = await self._add(engine, request_id, ids, parsed, max_tokens)
        steps = self._steps(engine, request_id, queue, parsed.stop_strings(), parser, start)
        base = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}

        if not parsed.stream:
            async def collect() -> JSONResponse:
                message: dict[str, Any] = {"role": "assistant", "content": ""}
                reason, usage = None, {}
                async for step in steps:
                    for d in step.deltas:
                        _merge(message, d)
                    reason, usage = step.finish_reason, step.usage
                if message.get("tool_calls") and reason == "stop":
                    reason = "tool_calls"
                if message.get("tool_calls") and not message["content"]:
                    message["content"] = None
                return JSONResponse({**base, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                          "finish_reason": reason}], "usage": usage})

            return await self._until_disconnect(request, collect()) or Response(status_code=499)

        chunk_base = {**base, "object": "chat.completion.chunk"}

        def chunk(delta: dict[str, Any], reason: str | None) -> str:
            return _sse({**chunk_base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": reason}], "usage": None})

        async def chunks() -> AsyncIterator[str]:
            usage: dict[str, Any] = {}
            tool_calls = False
            yield chunk({"role": "assistant", "content": ""}, None)
            async for step in steps:
                for d in step.deltas:
                    tool_calls = tool_calls or bool(d.get("tool_calls"))
                    yield chunk(d, None)
                usage = step.usage
                if step.finish_reason:
                    reason = "tool_calls" if tool_calls and step.finish_reason == "stop" else step.finish_reason
                    yield chunk({}, reason)
            if parsed.include_usage():
                yield _sse({**chunk_base, "choices": [], "usage": usage})

        return _event_stream(chunks(), steps)


def _event_stream(chunks: AsyncIterator[str], steps: AsyncIterator[Any]) -> _EventStream:
    """Server-sent events: the endpoint's chunks, then ``data: [DONE]``; an engine failure ends the stream
    with an error event; the request's steps are closed (the request aborted) however the stream ends."""
    async def events() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
            yield "data: [DONE]\n\n"
        except EngineDead as e:
            yield _sse(error_body(str(e), type="server_error", code="engine_dead"))
        finally:
            await steps.aclose()

    return _EventStream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _merge(message: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold one streamed delta into the whole message (text appended, tool calls by index)."""
    for key in ("content", "reasoning_content"):
        if delta.get(key):
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls))
        while len(calls) <= index:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        target = calls[index]
        if call.get("id"):
            target["id"] = call["id"]
        fn = call.get("function") or {}
        target["function"]["name"] += fn.get("name") or ""
        target["function"]["arguments"] += fn.get("arguments") or ""


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
