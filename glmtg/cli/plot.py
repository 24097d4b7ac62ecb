"""``glmtg plot``: overlay several sweep-bench JSON files (S_TG and S_PP vs N_KV)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from glmtg.cli import common
from glmtg.eval.plot import plot_runs
from glmtg.eval.sweep import run_label
from glmtg.files import existing_file


def load_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(environment, rows) of a ``glmtg sweep-bench -o`` file."""
    path = existing_file(path, "sweep-bench JSON")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    keys = ("n_kv", "speed_tg", "speed_pp")
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and all(number(r.get(k)) for k in keys)
                                                         for r in rows):
        raise ValueError(f"{path} is not a glmtg sweep-bench result (no rows with numbers {', '.join(keys)})")
    env = doc.get("environment")
    if not isinstance(env, dict):
        env = {}
    return env, rows


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("plot", help="overlay sweep-bench JSON results in one PNG",
                              description="S_TG and S_PP vs N_KV of several `glmtg sweep-bench -o` files.")
    p.add_argument("inputs", nargs="+", metavar="RUN.json", help="sweep-bench result files")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="image to write")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="one label per input (default: attention backend and KV types, plus the file name "
                        "where those repeat)")
    p.add_argument("--title", default="", help="figure title")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.labels is not None and len(args.labels) != len(args.inputs):
        raise ValueError(f"--labels got {len(args.labels)} labels for {len(args.inputs)} inputs")
    out = common.check_output_file(args.output, "-o")
    if any(Path(p).resolve() == out.resolve() for p in args.inputs):
        raise ValueError(f"-o {out} is one of the inputs; give the image another name")
    runs = [load_run(p) for p in args.inputs]
    labels = list(args.labels) if args.labels else [run_label(env) for env, _ in runs]
    if not args.labels:
        for i, label in enumerate(labels):
            if labels.count(label) > 1 or any(r[0].get("device") != runs[0][0].get("device") for r in runs):
                labels[i] = f"{label} ({Path(args.inputs[i]).stem})"
    plot_runs([(label, rows) for label, (_, rows) in zip(labels, runs, strict=True)], out, args.title)
    print(f"wrote {out}")
    return 0

