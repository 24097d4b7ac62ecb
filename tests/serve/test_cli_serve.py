"""``glmtg serve``: flag errors as one line, and a live run (tiny preset) with the engine replaced by the fake."""

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import glmtg.cli.serve as serve_cli
from glmtg.cli import main
from tests.references.fake_serve import FakeEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port"),
    (["--parallel", "0"], "--parallel"),
    (["--gpus", "2"], "--gpus and -ts need -sm"),
    (["--alias", " "], "--alias"),
    (["--api-key", ""], "--api-key"),
    (["--cuda-graph-sizes", "0"], "--cuda-graph-sizes"),
    (["--parallel", "4", "--cuda-graph-sizes", "8", "16"], "--cuda-graph-sizes"),
    (["--host", "192.0.2.1"], "cannot bind 192.0.2.1"),  # TEST-NET-1: never a local address
])
def test_flag_errors_are_one_line(capsys, argv, message):
    rc = main(["serve", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_taken_port_is_an_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc = main(["serve", "--port", str(s.getsockname()[1]), "-c", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot bind"), err


def test_engine_build_failure_ends_the_command(capsys, monkeypatch):
    def fail(args, loaded, eos):
        raise ValueError("the serving engine is not available in this build (test)")

    monkeypatch.setattr(serve_cli, "build_engine", fail)
    rc = main(["serve", "--port", str(free_port()), "-c", "64", "--device", "cpu", "--dtype", "f32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: the serving engine is not available"), err


def test_serve_runs_until_stopped(monkeypatch):
    servers = []

    class Recording(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recording)
    monkeypatch.setattr(serve_cli, "build_engine", lambda args, loaded, eos: FakeEngine(loaded.tokenizer))
    port = free_port()
    result = []
    thread = threading.Thread(target=lambda: result.append(main([
        "serve", "--port", str(port), "-c", "64", "--device", "cpu", "--dtype", "f32", "--api-key", "k",
        "--alias", "tiny-model"])))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # 503 while loading, then 200
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline and thread.is_alive(), "the server never became healthy"
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-model"]
        out = c.completions.create(model="tiny-model", prompt="x", max_tokens=3)
        assert out.choices[0].text == "Hel"
    finally:
        for s in servers:
            s.should_exit = True
        thread.join(15)
    assert result == [0]
