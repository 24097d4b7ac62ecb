"""``glmtg sweep-bench``: llama-sweep-bench's method and table.

At each cache depth N_KV = 0, ub, 2ub, ...: generate TG tokens (timed, then removed from the cache),
then process PP = ub random tokens (timed, kept, so N_KV grows by ub per row), until -c is full.
Input tokens are random ids, as llama-sweep-bench uses. TG is also reported as bandwidth: the bytes
one decode step must read (active weights + the KV cache at that depth) times tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from glmtg.cli import common
from glmtg.config import ModelConfig
from glmtg.engine import Engine

# llama-sweep-bench's exact header and row formats
HEADER = "|%6s | %6s | %6s | %8s | %8s | %8s | %8s |" % ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s")
SEPARATOR = "|%6s-|-%6s-|-%6s-|-%8s-|-%8s-|-%8s-|-%8s-|" % ("------", "------", "------", "--------", "--------",
                                                           "--------", "--------")


@dataclass(frozen=True)
class SweepRow:
    """One row; field names are llama-sweep-bench's JSONL keys."""

    pp: int
    tg: int
    n_kv: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    tg_gbps: float | None = None  # estimated bytes read per TG token x tokens/s

    def format(self) -> str:
        return "|%6d | %6d | %6d | %8.3f | %8.2f | %8.3f | %8.2f |" % (
            self.pp, self.tg, self.n_kv, self.t_pp, self.speed_pp, self.t_tg, self.speed_tg)


def sweep_depths(ctx_size: int, ubatch: int, tg: int) -> list[int]:
    """N_KV of each row: multiples of ub whose TG and PP both fit in the context."""
    return [n for n in range(0, ctx_size, ubatch) if n + max(ubatch, tg) <= ctx_size]


def active_weight_bytes(config: ModelConfig, bytes_per_weight: float) -> int:
    """Weight bytes one decode token reads: all but the unchosen routed experts, one embedding row.

    An estimate from the shapes (biases and norms ignored; the router is fp32, as the model keeps it).
    """
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = h * q + 2 * h * kv + q * h
    dense = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    moe = (config.num_experts_per_tok + config.n_shared_experts) * expert
    n_dense = config.first_k_dense_replace
    n_moe = config.num_hidden_layers - n_dense
    weights = h + config.vocab_size * h + config.num_hidden_layers * attention + n_dense * dense + n_moe * moe
    router = n_moe * h * config.n_routed_experts * 4
    return int(weights * bytes_per_weight + router)


def run_sweep(
    engine: Engine,
    *,
    tg: int,
    seed: int = 0,
    on_row: Callable[[SweepRow], None] | None = None,
    progress: bool = True,
) -> list[SweepRow]:
    """Run the sweep on an engine (batch 1) from an empty cache; rows as llama-sweep-bench makes them."""
    if engine.batch != 1:
        raise ValueError(f"sweep-bench runs one sequence; the engine has batch {engine.batch}")
    ub, ctx = engine.ubatch, engine.ctx_size
    if tg < 1:
        raise ValueError(f"TG must be >= 1, got {tg}")
    depths = sweep_depths(ctx, ub, tg)
    if not depths:
        raise ValueError(f"-c {ctx} is smaller than one step (-ub {ub}, TG {tg}): nothing to measure")
    vocab = engine.config.vocab_size
    weight_bytes = active_weight_bytes(engine.config, next(engine.model.parameters()).element_size())
    kv_per_token = engine.cache.bytes_per_token
    gen = torch.Generator().manual_seed(seed)
    engine.reset()
    rows: list[SweepRow] = []
    for n_kv in tqdm(depths, desc="sweep", unit="row", leave=False, file=sys.stderr, disable=not progress,
                     dynamic_ncols=True):
        tg_ids = torch.randint(0, vocab, (tg,), generator=gen).to(engine.device)
        pp_ids = torch.randint(0, vocab, (ub,), generator=gen).to(engine.device)
        engine.synchronize()
        t0 = time.perf_counter()
        for i in range(tg):
            engine.decode_step(tg_ids[i:i + 1])
        engine.synchronize()
        t_tg = time.perf_counter() - t0
        engine.truncate(n_kv)

        engine.synchronize()
        t0 = time.perf_counter()
        engine.prefill(pp_ids, progress=False)
        engine.synchronize()
        t_pp = time.perf_counter() - t0

        speed_tg = tg / t_tg
        # token i of the TG run reads n_kv + i + 1 cached tokens: the mean depth is n_kv + (tg + 1) / 2
        step_bytes = weight_bytes + kv_per_token * (n_kv + (tg + 1) / 2)
        row = SweepRow(pp=ub, tg=tg, n_kv=n_kv, t_pp=t_pp, speed_pp=ub / t_pp, t_tg=t_tg, speed_tg=speed_tg,
                       tg_gbps=speed_tg * step_bytes / 1e9)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    engine.reset()
    return rows


def write_json(path: str | Path, rows: list[SweepRow], environment: dict[str, Any], tg: int) -> None:
    doc = {"tool": "glmtg sweep-bench", "environment": environment, "pp": rows[0].pp if rows else None, "tg": tg,
           "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def plot_runs(runs: list[tuple[str, list[dict[str, Any]]]], path: str | Path, title: str = "") -> None:
    """S_TG and S_PP vs N_KV, one line per run (label, rows as in the JSON)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tg, ax_pp) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in runs:
        n_kv = [r["n_kv"] for r in rows]
        ax_tg.plot(n_kv, [r["speed_tg"] for r in rows], marker="o", markersize=3, label=label)
        ax_pp.plot(n_kv, [r["speed_pp"] for r in rows], marker="o", markersize=3, label=label)
    for ax, what in ((ax_tg, "S_TG (generation)"), (ax_pp, "S_PP (prompt processing)")):
        ax.set_xlabel("N_KV (tokens in the cache)")
        ax.set_ylabel("tokens / s")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_label(environment: dict[str, Any]) -> str:
    kv = environment.get("ctk", "?")
    if environment.get("ctv") not in (None, kv):
        kv = f"{kv}/{environment['ctv']}"
    return f"attn={environment.get('attn', '?')} kv={kv}"


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
    p.add_argument("--seed", type=common.non_negative_int, default=0, help="seed of the random input tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    tg = args.n_predict if args.n_predict is not None else max(1, args.ubatch_size // 4)
    if not sweep_depths(args.ctx_size, args.ubatch_size, tg):
        raise ValueError(f"-c {args.ctx_size} is smaller than one step (-ub {args.ubatch_size}, TG {tg})")
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {Path(args.output).parent}")
    loaded = common.load(args, need_tokenizer=False)
    engine = common.build_engine(args, loaded)
    common.print_banner(engine)
    if not args.no_warmup:
        engine.warmup(prefill_tokens=engine.ubatch)
    env = common.environment(args, loaded, engine)
    print(f"\nmain: model = {loaded.name}, n_kv_max = {engine.ctx_size}, n_ubatch = {engine.ubatch}, tg = {tg}, "
          f"attn = {engine.attn_backend}, ctk = {env['ctk']}, ctv = {env['ctv']}, dtype = {args.dtype}, "
          f"device = {env['device']}, cuda_graph = {int(engine.uses_cuda_graph)}\n")
    print(HEADER)
    print(SEPARATOR, flush=True)

    def show(row: SweepRow) -> None:
        tqdm.write(row.format(), file=sys.stdout)
        sys.stdout.flush()

    rows = run_sweep(engine, tg=tg, seed=args.seed, on_row=show, progress=not args.no_progress)
    print("\nTG bandwidth (active weights + KV read per token, estimated), GB/s: "
          + ", ".join(f"{r.tg_gbps:.3g} @ {r.n_kv}" for r in rows))
    if args.output is not None:
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
