"""The ``glmtg`` command: one entry point, one module per subcommand.

Subcommands: sweep-bench, perplexity, generate, plot, make-gguf, serve. Every user error (bad flag value, missing or
corrupt file, wrong model type, missing tokenizer, a context too small) ends the command with one
``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

SUBCOMMANDS = ("sweep-bench", "perplexity", "generate", "plot", "make-gguf", "serve")


def _prepare_triton(argv: list[str]) -> None:
    """Without CUDA (or with --device cpu) the Triton kernels run in the interpreter.

    Triton decides per kernel when the module defining it is imported, so this runs before any
    glmtg module that holds kernels is imported.
    """
    import torch

    device = None
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if not torch.cuda.is_available() or (device or "").startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    # library warnings (a context beyond the trained positions, a failed graph capture) as one line
    from glmtg.cli.common import as_flags

    print(f"warning: {as_flags(_one_line(message if isinstance(message, Warning) else Warning(message)))}",
          file=sys.stderr if file is None else file)


def _is_host_oom(error: RuntimeError) -> bool:
    # torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text


def build_parser():  # -> common.CliParser (imported lazily, see _prepare_triton)
    from glmtg.cli import common, generate, make_gguf, perplexity, plot, serve, sweep_bench

    parser = common.CliParser(prog="glmtg", description="GLM-4.5/4.6/4.7/Air inference on glmtg's Triton kernels. "
                                                       "Without -m, models have seeded random weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=common.CliParser)
    for module in (sweep_bench, perplexity, generate, plot, make_gguf, serve):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``glmtg ARGS``; returns the exit status (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_triton(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        print(f"error: give a command: {', '.join(SUBCOMMANDS)} (see glmtg --help)", file=sys.stderr)
        return 2
    if getattr(args, "split_allowed", True) and (getattr(args, "split_mode", "none") != "none"
                                                  or getattr(args, "gpus", 1) != 1
                                                  or getattr(args, "tensor_split", None) is not None
                                                  or getattr(args, "tp_experts", None) is not None):
        from glmtg.cli.ranks import launch

        return run_command(args, launch)  # checks the split flags, then every rank runs the command
    return run_command(args)


def run_command(args: argparse.Namespace, run: Callable[[argparse.Namespace], int | None] | None = None) -> int:
    """Run the parsed command (``run(args)``, default ``args.run(args)``) with the CLI's error handling:
    one ``error:`` line and status 2 for user errors. Every rank of a split run calls it too."""
    import torch

    from glmtg.cli.common import as_flags

    run = args.run if run is None else run
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(run(args) or 0)
        except (ValueError, OSError) as e:  # OSError: missing, unreadable or unwritable files
            print(f"error: {as_flags(_one_line(e))}", file=sys.stderr)
            return 2
        except (torch.OutOfMemoryError, MemoryError) as e:
            print(f"error: out of memory: {_one_line(e)[:300]}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            if not _is_host_oom(e):
                raise
            print(f"error: out of host memory: {_one_line(e)[:300]}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        finally:
            from glmtg.cli.experts import write_counts

            write_counts()  # --save-expert-counts: what the run counted, also after an error or Ctrl-C
