"""A scripted fake LLMEngine (LLMEngine's interface, no model) and a live uvicorn server around it, for the
HTTP layer's tests (tests/serve/)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import uvicorn

from glmtg.loading.byte_tokenizer import ByteTokenizer
from glmtg.serve.app import create_app
from glmtg.serve.llm_engine import QueueFull
from glmtg.serve.async_engine import AsyncEngine
from glmtg.serve.sequence import SamplingSpec, TokenEvent

EOS = 299
MODEL = "glmtg-test"
MAX_MODEL_LEN = 256
# multi-byte characters (é, €) make byte tokens that end mid-character; "Stop" is a stop-string target
REPLY = "Hello é world, 3 € each. Stop here; then more."
FOREVER = "forever"  # a prompt containing it never reaches EOS (runs to max_tokens)



def default_reply(prompt: str) -> str:
    return REPLY


class FakeEngine:
    """LLMEngine's interface over scripted outputs: each running request emits the next byte of
    ``reply(prompt_text)`` per step, then EOS; prompts containing FOREVER cycle the reply instead.

    Records every add, abort and spec so tests can see what the server asked for.
    """

    def __init__(self, tokenizer: ByteTokenizer, *, reply: Callable[[str], str] = default_reply,
                 max_num_seqs: int = 8, max_waiting: int = 64, step_delay: float = 0.0, block_size: int = 16,
                 num_blocks: int = 256) -> None:
        self.tok = tokenizer
        self.reply = reply
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.step_delay = step_delay
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.waiting: deque[str] = deque()
        self.running: list[str] = []
        self.seqs: dict[str, dict] = {}
        self.added: list[tuple[str, list[int], SamplingSpec, int]] = []
        self.aborted: list[str] = []
        self.fail_on_step = False
        self.prompt_total = 0
        self.generated_total = 0
        self.lock = threading.Lock()  # tests read the records from another thread

    def add_request(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec, max_tokens: int) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id}")
        if max_tokens < 1 or len(prompt_ids) + max_tokens > MAX_MODEL_LEN:
            raise ValueError("max_tokens out of range")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are waiting")
        prompt = self.tok.decode(prompt_ids)
        text = self.reply(prompt)
        script = list(text.encode("utf-8"))
        if FOREVER in prompt:
            script = script * (MAX_MODEL_LEN // len(script) + 1)
        else:
            script.append(EOS)
        with self.lock:
            self.added.append((request_id, list(prompt_ids), spec, max_tokens))
        self.seqs[request_id] = {"prompt": len(prompt_ids), "script": script, "out": 0, "max": max_tokens}
        self.waiting.append(request_id)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.append(request_id)
        if request_id in self.seqs:
            del self.seqs[request_id]
            if request_id in self.waiting:
                self.waiting.remove(request_id)
            if request_id in self.running:
                self.running.remove(request_id)

    def step(self) -> list[TokenEvent]:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_on_step:
            raise RuntimeError("scripted failure")
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        events = []
        for rid in list(self.running):
            seq = self.seqs[rid]
            token = seq["script"][seq["out"]]
            seq["out"] += 1
            self.generated_total += 1
            if seq["out"] == 1:
                self.prompt_total += seq["prompt"]
            reason = "stop" if token == EOS else "length" if seq["out"] >= seq["max"] else None
            events.append(TokenEvent(rid, token, reason is not None, reason, seq["prompt"], 0))
            if reason is not None:
                self.running.remove(rid)
                del self.seqs[rid]
        return events

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        used = sum(-(-(s["prompt"] + s["out"]) // self.block_size) for s in self.seqs.values())
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_blocks_used": used,
                "kv_blocks_total": self.num_blocks, "kv_usage": used / self.num_blocks, "prefix_hit_tokens": 0,
                "prompt_tokens": self.prompt_total, "generated_tokens": self.generated_total}


@contextlib.contextmanager
def live_server(engine_kwargs: dict | None = None, *, engine=None, tokenizer=None, max_model_len: int = MAX_MODEL_LEN,
                **app_kwargs) -> Iterator[tuple[str, FakeEngine, AsyncEngine]]:
    """A real uvicorn server on 127.0.0.1 (free port) in a thread, serving a FakeEngine (or ``engine``, e.g. a
    real LLMEngine, with its ``tokenizer``)."""
    tok = tokenizer if tokenizer is not None else ByteTokenizer(300, eos_token_ids=(EOS,))
    if engine is None:
        engine = FakeEngine(tok, **(engine_kwargs or {}))
    async_engine = AsyncEngine(engine, tok)
    app = create_app(async_engine, tok, MODEL, max_model_len=max_model_len, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine, async_engine
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
