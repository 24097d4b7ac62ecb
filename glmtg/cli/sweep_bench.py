"""``glmtg sweep-bench``: llama-sweep-bench's table for ``glmtg.eval.sweep.run_sweep``.

With ``-o FILE.json`` the rows and the run's environment are written as JSON, and the S_TG / S_PP
figure as FILE.png beside it (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from glmtg.cli import common, ranks
from glmtg.cpu.stream_experts import settings as host_prefill_settings
from glmtg.eval.plot import plot_runs
from glmtg.eval.sweep import SweepRow, run_label, run_sweep, sweep_depths, write_json

# llama-sweep-bench's exact header and row formats
HEADER = "|%6s | %6s | %6s | %8s | %8s | %8s | %8s |" % ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s")
SEPARATOR = "|%6s-|-%6s-|-%6s-|-%8s-|-%8s-|-%8s-|-%8s-|" % ("------", "------", "------", "--------", "--------",
                                                           "--------", "--------")


def format_row(row: SweepRow) -> str:
    """One table row, as llama-sweep-bench prints it."""
    return "|%6d | %6d | %6d | %8.3f | %8.2f | %8.3f | %8.2f |" % (
        row.pp, row.tg, row.n_kv, row.t_pp, row.speed_pp, row.t_tg, row.speed_tg)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep-bench", help="PP and TG speed at every cache depth (llama-sweep-bench)",
        description="At each cache depth N_KV (0, ub, 2ub, ... until -c is full) time TG tokens of generation "
                    "(then removed) and a PP batch of ub random tokens (kept). Prints llama-sweep-bench's table.")
    common.add_model_flags(p, ctx_default=4096)
    p.add_argument("-n", "--n-predict", type=common.positive_int, default=None, metavar="N",
                   help="TG tokens per row (default: ub/4, as llama-sweep-bench)")
    p.add_argument("-o", "--output", metavar="FILE.json", default=None,
                   help="write rows + environment as JSON, and FILE.png (S_TG, S_PP vs N_KV) beside it")
    p.add_argument("--seed", type=common.non_negative_seed, default=0, help="seed of the random input tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.ubatch_size is None:  # the device's default chunk, resolved now: TG and the row check depend on it
        args.ubatch_size = common.default_ubatch(common.resolve_device(args.device), args.ctx_size)
    tg = args.n_predict if args.n_predict is not None else max(1, args.ubatch_size // 4)
    if max(args.ubatch_size, tg) > args.ctx_size:  # no row fits (sweep_depths would be empty)
        raise ValueError(f"-c {args.ctx_size} is smaller than one step (-ub {args.ubatch_size}, TG {tg})")
    if args.output is not None:  # both files, before the sweep: a long run must not end in a failed write
        if Path(args.output).suffix.lower() == ".png":
            raise ValueError(f"-o takes the JSON file's name (the PNG is written beside it), got {args.output}")
        common.check_output_file(args.output, "-o")
        common.check_output_file(Path(args.output).with_suffix(".png"), "the figure")
    source = common.model_source(args)
    loaded = common.load(args, source, ctx_size=args.ctx_size)
    engine = common.build_engine(args, loaded)
    common.print_banner(loaded)
    if not args.no_warmup:
        engine.warmup(prefill_tokens=engine.settings.ubatch)
    env = common.environment(args, loaded, engine)
    print(f"\nmain: model = {loaded.name}, n_kv_max = {engine.settings.ctx_size}, n_ubatch = {engine.settings.ubatch}, tg = {tg}, "
          f"attn = {engine.settings.attn_backend}, ctk = {env['ctk']}, ctv = {env['ctv']}, dtype = {args.dtype}, "
          f"device = {env['device']}, cuda_graph = {int(engine.uses_cuda_graph)}\n")
    print(HEADER)
    print(SEPARATOR, flush=True)

    depths = sweep_depths(engine.settings.ctx_size, engine.settings.ubatch, tg)
    with tqdm(total=len(depths), desc="sweep", unit="row", leave=False, file=sys.stderr, disable=args.no_progress,
              dynamic_ncols=True) as bar:
        def show(row: SweepRow) -> None:
            bar.write(format_row(row), file=sys.stdout)
            sys.stdout.flush()
            bar.update(1)

        rows = run_sweep(engine, tg=tg, seed=args.seed, on_row=show)
    part = " of rank 0's part" if getattr(args, "split_mode", "none") != "none" else ""
    print(f"\nTG bandwidth{part} (active weights + KV read per token, estimated), GB/s: "
          + ", ".join(f"{r.tg_gbps:.3g} @ {r.n_kv}" for r in rows))
    streamed = host_prefill_settings(loaded.model)
    if streamed is not None:  # what the sweep did with host-placed experts (copies: warm-up included)
        env["host_prefill"] = streamed
        print(f"host prefill: {streamed['mode']} from {streamed['min_tokens']} tokens, "
              f"{streamed['staging_bytes'] / 1e9:.2f} GB staging, {streamed['copies']} layer copies")
    if args.output is not None and ranks.writes_files(args):
        env["tg"] = tg
        write_json(args.output, rows, env, tg)
        png = Path(args.output).with_suffix(".png")
        weights = " (random weights)" if loaded.random_weights else ""
        title = f"glmtg sweep-bench: {loaded.name}{weights}, {env['device']}"
        try:
            plot_runs([(run_label(env), [asdict(r) for r in rows])], png, title)
            print(f"wrote {args.output} and {png}")
        except ValueError as e:  # no matplotlib: the JSON is what matters
            print(f"wrote {args.output}; no PNG ({e})")
    return 0
