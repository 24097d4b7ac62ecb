"""``glmtg serve``: an OpenAI-compatible HTTP server with continuous batching.

The port is bound first (a taken port fails at once), the server starts answering (/health 503
"loading"), and the model loads in a background thread; once the engine runs, /health says ok.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from glmtg.cli import common


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
    # one process owns the model: the split modes' ranks would each start a server
    p.set_defaults(run=run, split_allowed=False)


def model_name(args: argparse.Namespace) -> str:
    if args.alias is not None:
        if not args.alias.strip():
            raise ValueError("--alias must not be empty")
        return args.alias
    if args.model is not None:
        return Path(args.model).name or str(args.model)
    return f"glmtg-{args.preset or 'tiny'}"


def build_engine(args: argparse.Namespace, loaded: common.Loaded, eos: tuple[int, ...]) -> Any:
    """The runner and LLMEngine for the loaded model (imported here: the serving engine's modules)."""
    try:
        from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
        from glmtg.serve.runner import ModelRunner
    except ImportError as e:
        raise ValueError(f"the serving engine is not available in this build ({e})") from None
    settings = common.engine_config(args, args.ctx_size)
    runner = ModelRunner(loaded.model, loaded.config, block_size=args.block_size, max_num_seqs=args.parallel,
                         max_model_len=args.ctx_size, k_format=settings.k_format, v_format=settings.v_format,
                         device=loaded.device, cuda_graphs=False if args.no_cuda_graph else None,
                         graph_sizes=args.cuda_graph_sizes)
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


def run(args: argparse.Namespace) -> int:
    if args.split_mode != "none" or args.gpus != 1 or args.tensor_split is not None:
        raise ValueError("serve runs on one device: -sm, --gpus and -ts are not supported")
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
    source = common.model_source(args)
    tok = common.load_tokenizer(source)
    sock = _bind(args.host, args.port)
    app = create_app(None, tok, name, api_key=args.api_key, max_body_bytes=args.max_body,
                     max_model_len=args.ctx_size)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on"))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            loaded = common.load(args, source, ctx_size=args.ctx_size, tokenizer=tok)
            common.print_banner(loaded, file=sys.stderr)
            eos = tuple(tok.eos_token_ids or loaded.config.eos_token_ids)
            app.state.engine = AsyncEngine(build_engine(args, loaded, eos), tok)
            print(f"serving {name} on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread as the command's error
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=load, name="glmtg-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise failure[0]
    return 0
