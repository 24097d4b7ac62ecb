"""The bridge between asyncio HTTP handlers and the synchronous LLMEngine.

One background thread owns the engine: it applies the commands handlers queue (add, abort), runs
``engine.step()`` while there is work, and hands each TokenEvent to its request's asyncio.Queue through
``loop.call_soon_threadsafe``. Only that thread touches the engine, so the engine needs no locks. When a
step raises, the engine is marked dead: every pending request gets ``EngineDead`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from glmtg.eval.detokenize import IncrementalDecoder
from glmtg.serve.sequence import SamplingSpec, TokenEvent


class EngineDead(RuntimeError):
    """The engine's step raised; the server can answer nothing but errors (and 503 on /health)."""


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class TextDelta:
    """One streamed step of a request: its new text (complete UTF-8 only) and where it stands."""

    text: str
    token_ids: list[int]  # the tokens this delta adds (may be non-empty while text is "", held back)
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # generated so far
    times: list[float] = field(default_factory=list)  # monotonic arrival time of each new token


class AsyncEngine:
    """Runs ``engine`` (LLMEngine's interface) in a background thread for asyncio callers."""

    def __init__(self, engine: Any, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._requests: dict[str, _Request] = {}  # touched by the engine thread only
        self._closed = False
        self.dead: BaseException | None = None
        self._stats: dict[str, Any] = dict(engine.stats())
        self._thread = threading.Thread(target=self._loop, name="glmtg-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ event-loop side

    @property
    def alive(self) -> bool:
        return self.dead is None and not self._closed

    def stats(self) -> dict[str, Any]:
        """The engine's stats after its latest step (a copy the engine thread replaces whole)."""
        return self._stats

    def _submit(self, command: str, payload: Any) -> bool:
        """Queue a command for the engine thread; False (nothing queued) once the engine has stopped."""
        with self._cond:
            if not self.alive:
                return False
            self._commands.append((command, payload))
            self._cond.notify()
            return True

    async def add(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec, max_tokens: int) -> asyncio.Queue:
        """Add a request; returns the queue its TokenEvents arrive on.

        Raises what ``engine.add_request`` raises (ValueError, QueueFull) and EngineDead.
        """
        if not self.alive:
            raise EngineDead(f"the engine is not running ({self.dead or 'shut down'})")
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        queue: asyncio.Queue = asyncio.Queue()
        if not self._submit("add", (request_id, list(prompt_ids), spec, max_tokens, _Request(loop, queue), accepted)):
            raise EngineDead(f"the engine is not running ({self.dead or 'shut down'})")
        try:
            await accepted  # raises the engine's refusal
        except asyncio.CancelledError:
            self.abort(request_id)  # the handler went away while the engine thread was adding it
            raise
        return queue

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op once it finished); thread-safe and non-blocking."""
        self._submit("abort", request_id)

    async def events(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        """The TokenEvents of a request ``add`` accepted, until it finishes; the request is aborted when the
        consumer stops early (closes the generator or is cancelled)."""
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine is gone: nothing to abort
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                       max_tokens: int) -> AsyncIterator[TokenEvent]:
        """``add`` then ``events``: the request's TokenEvents, aborted when the consumer stops early."""
        queue = await self.add(request_id, prompt_ids, spec, max_tokens)
        events = self.events(request_id, queue)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def stream_text(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TextDelta]:
        """``events`` with incremental detokenization: text only once it is complete UTF-8 (a trailing
        U+FFFD is held back until the next token completes the character).

        A finish by "stop" (an EOS token) does not add the EOS token's text.
        """
        decoder = IncrementalDecoder(self.tokenizer.decode)
        generated = 0
        events = self.events(request_id, queue)
        try:
            async for event in events:
                delta = TextDelta("", [], False, None, event.prompt_tokens, event.cached_tokens, generated)
                self._apply(event, delta, decoder)
                generated = delta.completion_tokens
                yield delta
                if delta.finished:
                    return
        finally:
            await events.aclose()

    async def generate_text(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                            max_tokens: int) -> AsyncIterator[TextDelta]:
        """``add`` then ``stream_text``."""
        queue = await self.add(request_id, prompt_ids, spec, max_tokens)
        deltas = self.stream_text(request_id, queue)
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()

    @staticmethod
    def _apply(event: TokenEvent, delta: TextDelta, decoder: IncrementalDecoder) -> None:
        now = time.monotonic()
        if event.token_id is not None:
            delta.completion_tokens += 1
            delta.token_ids.append(event.token_id)
            delta.times.append(now)
            if not (event.finished and event.finish_reason == "stop"):
                delta.text += decoder.push(event.token_id)
        if event.finished:
            delta.text += decoder.flush()
            delta.finished = True
            delta.finish_reason = event.finish_reason

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (pending requests get EngineDead)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._closed and not self._has_work():
                    self._cond.wait()
                commands, self._commands = self._commands, []
                closed = self._closed
            try:
                for command, payload in commands:
                    self._apply_command(command, payload)
                if closed:
                    self._fail_all(EngineDead("the server is shutting down"))
                    return
                if not self._has_work():
                    continue
                events = self.engine.step()
                self._stats = dict(self.engine.stats())
            except BaseException as e:  # noqa: BLE001 - any failure of the engine ends it, visibly
                with self._cond:  # under the lock: no add can slip in after the queued ones are failed
                    self.dead = e
                self._fail_all(EngineDead(f"the engine failed: {type(e).__name__}: {e}"))
                self._fail_commands()
                return
            for event in events:
                req = self._requests.get(event.request_id)
                if req is None:
                    continue  # aborted meanwhile
                if event.finished:
                    del self._requests[event.request_id]
                _deliver(req, event)

    def _has_work(self) -> bool:
        return self.dead is None and bool(self.engine.has_unfinished())

    def _apply_command(self, command: str, payload: Any) -> None:
        if command == "abort":
            if self._requests.pop(payload, None) is not None:
                self.engine.abort(payload)
            self._stats = dict(self.engine.stats())
            return
        request_id, prompt_ids, spec, max_tokens, req, accepted = payload
        try:
            if request_id in self._requests:
                raise ValueError(f"duplicate request id {request_id!r}")
            self.engine.add_request(request_id, prompt_ids, spec, max_tokens)
        except Exception as e:  # noqa: BLE001 - the refusal goes back to the handler that asked
            _resolve(req.loop, accepted, e)
            return
        self._requests[request_id] = req
        self._stats = dict(self.engine.stats())
        _resolve(req.loop, accepted, None)

    def _fail_all(self, error: BaseException) -> None:
        for req in self._requests.values():
            _deliver(req, error)
        self._requests.clear()

    def _fail_commands(self) -> None:
        # adds queued after the failure must not wait forever for an answer
        with self._cond:
            commands, self._commands = self._commands, []
        for command, payload in commands:
            if command == "add":
                _resolve(payload[4].loop, payload[5], EngineDead("the engine failed"))


def _deliver(req: _Request, item: Any) -> None:
    try:
        req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass

