"""End-to-end TG/PP vs context depth with each attention backend, side by side, one model.

On the GPU (GLM-4.5-Air shapes, bf16 random weights, as many layers as fit):
    python bench/sweep_bench_compare.py --preset glm-4.5-air --n-layers 8 -c 65536 -ub 2048 -n 32
runs ``glmtg sweep-bench`` once per backend (``--attn glmtg``, ``sdpa``, ``eager``; prefill chunks
use SDPA for all of them, so that eager's [heads, ub, N_KV] score tensors do not decide what fits),
each in its own process, then writes OUT-<attn>.json, OUT.md (S_TG per backend at each depth, the
ratios, and TG at N_KV = 0 as a fraction of the weight-read roofline) and OUT.png; OUT defaults to
bench/results/sweep_bench/<date>-<preset> (<date>-<preset>-combined with --combine).
Extra arguments after ``--`` go to every sweep-bench run (e.g. ``-- -ctk q8_0``).

Runs made separately (e.g. one per cache type) are put side by side without running anything by
    python bench/sweep_bench_compare.py --out bench/results/sweep_bench/2026-11-25-air-cache \
        --reference "sdpa bf16" --combine "glmtg bf16=A-glmtg.json" "glmtg q4_0=B-glmtg.json" "sdpa bf16=A-sdpa.json"
where every column's ratio is taken against the reference run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_path  # noqa: E402

BACKENDS = ("glmtg", "sdpa", "eager")


def run_backends(args: argparse.Namespace, extra: list[str]) -> dict[str, dict]:
    runs = {}
    for attn in args.attn:
        path = Path(f"{args.out}-{attn}.json")
        cmd = [sys.executable, "-m", "glmtg", "sweep-bench", "--preset", args.preset, "-c", str(args.ctx),
               "-ub", str(args.ubatch), "--attn", attn, "--attn-prefill", args.attn_prefill, "-o", str(path)]
        if args.n_layers:
            cmd += ["--n-layers", str(args.n_layers)]
        if args.n_predict:
            cmd += ["-n", str(args.n_predict)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd + extra, check=True)
        runs[attn] = json.loads(path.read_text())
    return runs


def cache_text(runs: dict[str, dict]) -> str:
    caches = {n: f"{r['environment'].get('ctk')}/{r['environment'].get('ctv')}" for n, r in runs.items()}
    if len(set(caches.values())) == 1:
        return f"cache {next(iter(caches.values()))}"
    return "caches " + ", ".join(f"{n}: {c}" for n, c in caches.items())


def markdown(runs: dict[str, dict], copy_bw: float | None, reference: str | None = None) -> str:
    """S_TG per run and depth; ratio columns are glmtg / each other backend, or each run / ``reference``."""
    first = next(iter(runs.values()))
    env = first["environment"]
    names = list(runs)
    pairs = ([(n, reference) for n in names if n != reference] if reference
             else [("glmtg", n) for n in names if n != "glmtg"])
    by_depth: dict[int, dict[str, dict]] = {}
    for attn, run in runs.items():
        for row in run["rows"]:
            by_depth.setdefault(row["n_kv"], {})[attn] = row
    lines = [
        f"# sweep-bench: {env.get('model')} ({env.get('dtype')}), attention backends side by side",
        "",
        f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · {cache_text(runs)}"
        f" · -c {env.get('ctx_size')} -ub {env.get('ubatch')} · prefill attention "
        f"{env.get('attn_prefill')} · random weights: {env.get('random_weights')} · {env.get('date', '')}",
        "",
        "| N_KV | " + " | ".join(f"S_TG {n} t/s" for n in names) + " | "
        + " | ".join(f"{a} / {b}" for a, b in pairs) + " | " + " | ".join(f"S_PP {n}" for n in names)
        + " |",
        "|---|" + "---|" * (2 * len(names) + len(pairs)),
    ]
    for n_kv in sorted(by_depth):
        rows = by_depth[n_kv]
        tg = [f"{rows[n]['speed_tg']:.2f}" if n in rows else "—" for n in names]
        ratios = [f"{rows[a]['speed_tg'] / rows[b]['speed_tg']:.2f}×" if a in rows and b in rows else "—"
                  for a, b in pairs]
        pp = [f"{rows[n]['speed_pp']:.1f}" if n in rows else "—" for n in names]
        lines.append(f"| {n_kv} | " + " | ".join(tg + ratios + pp) + " |")
    if copy_bw:
        lines += ["", f"TG bandwidth at N_KV = 0 (active weights + KV bytes per token × t/s) over the measured copy "
                      f"bandwidth {copy_bw / 1e12:.2f} TB/s:", ""]
        for n in names:
            row0 = by_depth.get(0, {}).get(n)
            if row0 and row0.get("tg_gbps"):
                lines.append(f"- {n}: {row0['tg_gbps']:.0f} GB/s = {row0['tg_gbps'] * 1e9 / copy_bw:.0%} of the roofline")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="glm-4.5-air")
    parser.add_argument("--n-layers", type=int, default=None)
    parser.add_argument("-c", "--ctx", type=int, default=65536)
    parser.add_argument("-ub", "--ubatch", type=int, default=2048)
    parser.add_argument("-n", "--n-predict", type=int, default=None, help="TG tokens per row (default ub/4)")
    parser.add_argument("--attn", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--attn-prefill", default="sdpa", choices=BACKENDS)
    parser.add_argument("--out", default=None, help="path stem of the outputs (default "
                        "bench/results/sweep_bench/<date>-<preset>[-combined])")
    parser.add_argument("--combine", nargs="+", metavar="LABEL=RUN.json",
                        help="put existing sweep-bench results side by side instead of running")
    parser.add_argument("--reference", default=None, help="with --combine: the label the ratios are taken against")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.out is None:
        args.out = str(result_path("sweep_bench", args.preset + ("-combined" if args.combine else "")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return combine(args)
    runs = run_backends(args, extra)
    copy_bw = None
    try:
        import torch

        if torch.cuda.is_available():
            from common import copy_bandwidth

            copy_bw = copy_bandwidth()
    except ImportError:
        pass
    Path(f"{args.out}.md").write_text(markdown(runs, copy_bw))
    from glmtg.eval.plot import plot_runs

    plot_runs([(f"attn={a}", r["rows"]) for a, r in runs.items()], f"{args.out}.png",
              title=f"{next(iter(runs.values()))['environment'].get('model')}: S_TG / S_PP vs N_KV")
    print(Path(f"{args.out}.md").read_text())
    return 0


def combine(args: argparse.Namespace) -> int:
    runs = {}
    for item in args.combine:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(f"error: --combine wants LABEL=RUN.json with an existing file, got {item!r}", file=sys.stderr)
            return 2
        runs[label] = json.loads(Path(path).read_text())
    if args.reference is not None and args.reference not in runs:
        print(f"error: --reference {args.reference!r} is not one of the labels {list(runs)}", file=sys.stderr)
        return 2
    text = markdown(runs, None, args.reference)
    dates = ", ".join(f"{label}: {run['environment'].get('date', '?')}" for label, run in runs.items())
    text += f"\nRuns combined (`--combine`): {dates}.\n"
    Path(f"{args.out}.md").write_text(text)
    from glmtg.eval.plot import plot_runs

    plot_runs([(label, r["rows"]) for label, r in runs.items()], f"{args.out}.png",
              title=f"{next(iter(runs.values()))['environment'].get('model')}: S_TG / S_PP vs N_KV")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
