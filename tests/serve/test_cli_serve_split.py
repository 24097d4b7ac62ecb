"""``glmtg serve -sm graph|layer --gpus 2`` on CPU (gloo): the command as a user runs it, in a subprocess, beside
the one-process server on the same random model (tiny preset, float32, seeded weights), driven over HTTP.

Tolerance: greedy outputs must be equal. -sm layer computes every layer as the single model does; -sm graph
sums float32 products in another order (~1e-6 relative in the logits, tests/parallel/test_engine_gloo.py),
far below the gaps between the best two tokens of these prompts (none is a near tie: the same texts came out
of every run). The byte tokenizer shows bytes >= 0x80 as U+FFFD, so the texts are compared together with their
token counts; tests/serve/test_split_runner_gloo.py compares the token ids themselves.

Shutdown: Ctrl-C (SIGINT to the ranks) stops rank 0's server, rank 0 sends the followers STOP and every rank
leaves through the launcher's barrier with status 0.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from glmtg.cli import main

ROOT = Path(__file__).resolve().parents[2]
MODEL = "glmtg-tiny"
PROMPTS = ["hello world", "Once upon a time"]
MODES = {"one": [], "graph": ["-sm", "graph", "--gpus", "2"], "layer": ["-sm", "layer", "--gpus", "2"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the ranks, and multiprocessing's resource tracker, which
    ignores SIGINT), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:  # the field after the state: the parent's pid
                found.append(int(entry))
    return found


class Server:
    def __init__(self, flags: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "glmtg", "serve", "--preset", "tiny", "--port", str(self.port), "-c", "64",
                 "--device", "cpu", "--dtype", "f32", "--parallel", "4", *flags],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the server never became healthy: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)

    def interrupt(self, timeout: float = 30, ranks_only: bool = False) -> int | None:
        """Ctrl-C to the whole process group (``ranks_only``: to the launcher's children alone, so that the
        launcher's exit status is the ranks'); the exit status, or None (then killed) if it did not end."""
        if self.proc.poll() is None:
            if ranks_only:
                for pid in _children(self.proc.pid):
                    os.kill(pid, signal.SIGINT)
            else:
                os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-split")
    started = {mode: Server(flags, logs / f"{mode}.log") for mode, flags in MODES.items()}  # start together
    try:
        deadline = time.monotonic() + 120
        for server in started.values():
            server.wait_healthy(deadline)
        yield started
    finally:
        for server in started.values():
            server.interrupt(5)


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _complete(server: Server, prompt: str) -> tuple[str, int]:
    out = _client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    return out.choices[0].text, out.usage.completion_tokens


def _chat_stream(server: Server, content: str) -> tuple[str, int]:
    stream = _client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, tokens = "", None
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            delta = choice.delta
            text += (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
    return text, tokens


@pytest.fixture(scope="module")
def alone(servers):
    """The one-process server's greedy outputs: each prompt's completion, and the streamed chat."""
    completions = {p: _complete(servers["one"], p) for p in PROMPTS}
    assert all(tokens == 8 for _, tokens in completions.values())
    chat = _chat_stream(servers["one"], PROMPTS[0])
    assert chat[1] == 8
    return completions, chat


@pytest.mark.parametrize("mode", ["graph", "layer"])
def test_greedy_completion_and_streamed_chat_equal_one_process(servers, alone, mode) -> None:
    completions, chat = alone
    assert _complete(servers[mode], PROMPTS[0]) == completions[PROMPTS[0]]
    assert _chat_stream(servers[mode], PROMPTS[0]) == chat


@pytest.mark.parametrize("mode", ["graph", "layer"])
def test_concurrent_requests_equal_alone(servers, alone, mode) -> None:
    completions, _ = alone
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _complete(servers[mode], p), PROMPTS))
    assert together == [completions[p] for p in PROMPTS]
    assert httpx.get(servers[mode].url + "/health").status_code == 200


def test_ctrl_c_stops_every_rank(servers) -> None:
    """SIGINT to the ranks (not the launcher, whose own Ctrl-C exit status is 130): rank 0 stops its server
    and the followers, and every rank ends with 0 (a follower that stopped on the signal itself would exit
    130, a rank left waiting would keep the command from ending)."""
    server = servers["graph"]
    assert len(_children(server.proc.pid)) >= 2
    rc = server.interrupt(ranks_only=True)
    log = server.log.read_text()
    assert rc == 0, f"exit status {rc} after Ctrl-C: {log[-2000:]}"
    assert "Traceback" not in log, log[-3000:]


def test_bad_split_flag_is_one_line(capfd) -> None:
    rc = main(["serve", "--preset", "tiny", "--device", "cpu", "--dtype", "f32", "-sm", "graph", "--gpus", "3"])
    _, err = capfd.readouterr()
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "num_key_value_heads (2) must be a multiple" in err, err
