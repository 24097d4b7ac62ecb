"""``glmtg serve``: an OpenAI-compatible HTTP server with continuous batching.

The port is bound first (a taken port fails at once), the server starts answering (/health 503
"loading"), and the model loads in a background thread; once the engine runs, /health says ok.

With ``-sm graph|layer --gpus N`` every rank runs this command (glmtg.cli.ranks): rank 0 binds the port
and serves as above, the other ranks load their part of the model, build a runner of the same pool and
run the steps rank 0 sends them until the server stops (glmtg.serve.split has the design and its limits).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from glmtg.cli import common, ranks


def _port(text: str) -> int:
    return common._int_at_least(text, 0, "a port in 0..65535", 65535)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)",
                              description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                          "/metrics. Binds 127.0.0.1 unless --host says otherwise.")
    common.add_model_flags(p, ctx_default=4096, ctx_help="context size per request (max_model_len): prompt + "
                                                         "generated tokens")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    g.add_argument("--port", type=_port, default=8080, help="TCP port (0: any free port)")
    g.add_argument("--parallel", type=common.positive_int, default=4, metavar="N",
                   help="sequences decoded together at most (running requests)")
    g.add_argument("--block-size", type=common.positive_int, default=16, metavar="N",
                   help="tokens per KV-cache page (the prefix cache shares whole pages)")
    g.add_argument("--max-queue", type=common.positive_int, default=64, metavar="N",
                   help="requests waiting for a slot at most; more get HTTP 503")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--alias", default=None, metavar="NAME",
                   help="model name clients must send (default: the -m file or directory name, or the preset)")
    g.add_argument("--cuda-graph-sizes", type=common.positive_int, nargs="+", default=None, metavar="N",
                   help="decode batch sizes to capture as CUDA graphs (default: 1 2 4 ... 64 below --parallel, "
                        "and --parallel; --no-cuda-graph: none)")
    g.add_argument("--max-body", type=common.positive_int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (larger: HTTP 413)")
    # -sm: rank 0 serves, the other ranks follow its model steps (glmtg.serve.split)
    p.set_defaults(run=run)


def model_name(args: argparse.Namespace) -> str:
    if args.alias is not None:
        if not args.alias.strip():
            raise ValueError("--alias must not be empty")
        return args.alias
    if args.model is not None:
        return Path(args.model).name or str(args.model)
    return f"glmtg-{args.preset or 'tiny'}"


def build_runner(args: argparse.Namespace, loaded: common.Loaded) -> Any:
    """The ModelRunner of the loaded model (of this rank's part under -sm: its KV heads or layers)."""
    try:
        from glmtg.serve.runner import ModelRunner
    except ImportError as e:
        raise ValueError(f"the serving engine is not available in this build ({e})") from None
    settings = common.engine_config(args, args.ctx_size)
    return ModelRunner(loaded.model, ranks.rank_engine_config(args, loaded.config), block_size=args.block_size,
                       max_num_seqs=args.parallel, max_model_len=args.ctx_size, k_format=settings.k_format,
                       v_format=settings.v_format, device=loaded.device,
                       cuda_graphs=False if args.no_cuda_graph else None, graph_sizes=args.cuda_graph_sizes)


def build_engine(args: argparse.Namespace, loaded: common.Loaded, eos: tuple[int, ...],
                 broadcaster: Any = None) -> Any:
    """The runner and LLMEngine for the loaded model (imported here: the serving engine's modules).

    ``broadcaster``: rank 0's ``glmtg.serve.split.StepBroadcaster`` under -sm (the runners of every rank are
    checked to agree, then each step goes to the followers before it runs); None in one process.
    """
    try:
        from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
    except ImportError as e:
        raise ValueError(f"the serving engine is not available in this build ({e})") from None
    runner = build_runner(args, loaded)
    if broadcaster is not None:
        from glmtg.serve.split import check_runners_agree

        check_runners_agree(runner, broadcaster.group)
        runner.before_forward = broadcaster
    settings = common.engine_config(args, args.ctx_size)
    config = SchedulerConfig(max_num_seqs=args.parallel, max_prefill_tokens=settings.ubatch,
                             max_model_len=args.ctx_size, max_waiting=args.max_queue)
    return LLMEngine(runner, config, eos)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any loading so that a taken port fails at once (OSError)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


def _follow(args: argparse.Namespace, control: Any) -> int:
    """A follower rank of a split server: load this rank's part, build its runner, run rank 0's steps."""
    from glmtg.serve.split import check_runners_agree, follow

    # Ctrl-C reaches every rank of the terminal's process group: rank 0 shuts its server down and then
    # stops the followers, so they ignore it (the launcher still ends them if rank 0 fails).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded = common.load(args, common.model_source(args), ctx_size=args.ctx_size)
    runner = build_runner(args, loaded)
    check_runners_agree(runner, control)
    follow(runner, control)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cuda_graph_sizes is not None and min(args.cuda_graph_sizes) > args.parallel:
        raise ValueError(f"--cuda-graph-sizes: every size exceeds --parallel {args.parallel} (no batch reaches it)")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"glmtg serve needs FastAPI and uvicorn ({e.name} is missing): "
                         f"pip install 'glmtg[serve]'") from None

    from glmtg.serve.app import create_app
    from glmtg.serve.async_engine import AsyncEngine

    name = model_name(args)
    group = ranks.rank_group(args)
    if group is not None and group.rank > 0:
        from glmtg.serve.split import control_group

        return _follow(args, control_group())
    source = common.model_source(args)
    tok = common.load_tokenizer(source)
    sock = _bind(args.host, args.port)
    broadcaster = None
    if group is not None:
        from glmtg.serve.split import StepBroadcaster, control_group

        broadcaster = StepBroadcaster(control_group())
    app = create_app(None, tok, name, api_key=args.api_key, max_body_bytes=args.max_body,
                     max_model_len=args.ctx_size)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on"))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            loaded = common.load(args, source, ctx_size=args.ctx_size, tokenizer=tok)
            common.print_banner(loaded, file=sys.stderr)
            eos = tuple(tok.eos_token_ids or loaded.config.eos_token_ids)
            engine = build_engine(args, loaded, eos) if broadcaster is None else \
                build_engine(args, loaded, eos, broadcaster)
            app.state.engine = AsyncEngine(engine, tok)
            print(f"serving {name} on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread as the command's error
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=load, name="glmtg-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        if broadcaster is None:
            raise
        # uvicorn re-raises the Ctrl-C it shut down on; a split server still stops its followers and ends
        # as the other ranks do (0), so that every rank reaches the launcher's closing barrier
    finally:
        sock.close()
    if broadcaster is not None:
        _stop_followers(app, loader, broadcaster, failure)
    if failure:
        raise failure[0]
    return 0


def _stop_followers(app: Any, loader: threading.Thread, broadcaster: Any, failure: list[BaseException]) -> None:
    """Rank 0 of a split server, once uvicorn has stopped: wait for the loading (the followers are in it too)
    and for the engine thread's last step, then send the followers STOP. A failed load sends nothing: the
    launcher ends the other ranks when this one exits with the error."""
    loader.join()
    if failure:
        return
    if app.state.engine is not None:
        app.state.engine.shutdown(timeout=None)  # no step may follow STOP: wait for the one under way
    broadcaster.stop()
