"""glmtg's TG beside llama.cpp's and ik_llama.cpp's on the same GGUF files, same GPU, same device session.

The peers are built and run on the GPU machine by ../shared/anchors/build_and_bench.sh (mainline
`llama-bench -p 0 -n 128 -d DEPTHS`, ik `llama-sweep-bench`); glmtg by `glmtg sweep-bench -m FILE.gguf -o
RUN.json` on the same file. This script (CPU) reads those outputs as they are — the peers' own tables, kept
next to the results — and writes one table, JSON and plot: TG t/s at each depth per engine and glmtg's ratio
to the better peer.

    python bench/peer_compare.py --out bench/results/peers/2026-11-28-air8 \\
        --glmtg q4_0/f16=glmtg_q4_0_f16.json --mainline q4_0/f16=mainline_f16_q4_0.txt [--ik q4_0/f16=ik.txt] ...

Each argument is CASE=PATH, CASE naming the file and cache type (e.g. q4_0/f16); rows are matched by depth
(N_KV). Where a peer's table has several rows near a depth (ik's sweep steps), the row at exactly that depth
is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

ENGINES = ("glmtg", "mainline", "ik")
LABELS = {"glmtg": "glmtg", "mainline": "llama.cpp", "ik": "ik_llama.cpp"}
COLORS = {"glmtg": "C0", "mainline": "C1", "ik": "C2"}


def read_glmtg(path: Path, metric: str = "tg") -> tuple[dict[int, float], dict]:
    data = json.loads(path.read_text())
    return {int(r["n_kv"]): float(r[f"speed_{metric}"]) for r in data["rows"]}, data.get("environment", {})


def read_glmtg_gbps(path: Path) -> dict[int, float]:
    """sweep-bench's TG read rate per depth (GB/s: weights and KV a token reads over its time; under -sm,
    rank 0's part)."""
    return {int(r["n_kv"]): float(r["tg_gbps"]) for r in json.loads(path.read_text())["rows"] if "tg_gbps" in r}


def read_mainline(path: Path, metric: str = "tg") -> dict[int, float]:
    """llama-bench's markdown: `tg128` (depth 0) and `tg128 @ dN` rows (``metric`` "tg"), or `ppN` and
    `ppN @ dN` rows ("pp": a run with PN='-p 4096 -n 0'), the t/s column as mean ± sd."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.search(r"\|\s*" + metric + r"\d+(?: @ d(\d+))?\s*\|\s*([\d.]+)\s*±", line)
        if m:
            out[int(m.group(1) or 0)] = float(m.group(2))
    return out


def read_ik(path: Path, metric: str = "tg") -> dict[int, float]:
    """llama-sweep-bench's table: | PP | TG | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | (``metric`` "tg":
    S_TG, "pp": S_PP)."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and all(re.fullmatch(r"[\d.]+", c) for c in cells):
            out[int(cells[2])] = float(cells[6 if metric == "tg" else 4])
    return out


def parse_cases(items: list[str] | None, what: str) -> dict[str, Path]:
    cases = {}
    for item in items or []:
        case, sep, path = item.partition("=")
        if not sep or not case or not path:
            raise SystemExit(f"error: {what} takes CASE=PATH, got {item!r}")
        cases[case] = Path(path)
    return cases


def compare(args: argparse.Namespace) -> dict:
    glmtg = parse_cases(args.glmtg, "--glmtg")
    peers = {"mainline": parse_cases(args.mainline, "--mainline"), "ik": parse_cases(args.ik, "--ik")}
    cases, env = {}, {}
    for case, path in glmtg.items():
        tg, env = read_glmtg(path, args.metric)
        runs = {"glmtg": tg}
        if case in peers["mainline"]:
            runs["mainline"] = read_mainline(peers["mainline"][case], args.metric)
        if case in peers["ik"]:
            runs["ik"] = read_ik(peers["ik"][case], args.metric)
        peer_depths = [set(r) for n, r in runs.items() if n != "glmtg"]
        depths = sorted(set(tg) & set().union(*peer_depths)) if peer_depths else sorted(tg)  # glmtg alone: all
        rows = []
        for d in depths:
            row = {"depth": d, **{e: runs[e].get(d) for e in runs}}
            best = max((v for e, v in row.items() if e in ("mainline", "ik") and v), default=None)
            row["vs_best_peer"] = row["glmtg"] / best if best else None
            if args.copy_tbs and args.metric == "tg":  # the fraction of the bandwidth limit glmtg reaches
                gbps = read_glmtg_gbps(path).get(d)
                row["glmtg_of_copy"] = gbps / (args.copy_tbs * 1e3) if gbps else None
            rows.append(row)
        cases[case] = rows
    base = getattr(args, "baseline", None)
    if base is not None:  # scaling: each engine's TG over its own TG in the baseline case (one GPU)
        if base not in cases:
            raise SystemExit(f"error: --baseline {base!r} is not one of the cases {list(cases)}")
        ref = {r["depth"]: r for r in cases[base]}
        for rows in cases.values():
            for r in rows:
                b = ref.get(r["depth"], {})
                for e in ("glmtg", "ik"):
                    r[f"{e}_scaling"] = r[e] / b[e] if r.get(e) and b.get(e) else None
    if args.commit:  # the device copy's git metadata can be stale: the commit the runs were made at
        env = {**env, "glmtg_commit": args.commit}
    return {"environment": env, "note": args.note, "baseline": base, "metric": args.metric,
            "copy_tbs": args.copy_tbs, "cases": cases}


def markdown(result: dict) -> str:
    env = result["environment"]
    what = result.get("metric", "tg").upper()
    lines = [f"# {what} t/s on the same GGUF weights: {env.get('device', '?')} (how the runs were made: below)", "",
             f"glmtg {env.get('glmtg_commit', '')} torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"{env.get('date', '?')}. {result.get('note') or ''}", "",
             "| case | depth | glmtg | llama.cpp | ik_llama.cpp | glmtg / best peer |"
             + (" glmtg / its baseline | ik / its baseline |" if result.get("baseline") else "")
             + (" glmtg read rate, of copy |" if result.get("copy_tbs") else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if result.get("baseline") else "")
             + ("---|" if result.get("copy_tbs") else "")]
    for case, rows in result["cases"].items():
        for r in rows:
            cells = [f"{r[e]:.1f}" if r.get(e) else "—" for e in ENGINES]
            ratio = f"{r['vs_best_peer']:.2f}×" if r.get("vs_best_peer") else "—"
            if result.get("baseline"):
                ratio += "".join(f" | {r[k]:.2f}×" if r.get(k) else " | —" for k in ("glmtg_scaling", "ik_scaling"))
            if result.get("copy_tbs"):
                ratio += f" | {r['glmtg_of_copy']:.0%}" if r.get("glmtg_of_copy") else " | —"
            lines.append(f"| {case} | {r['depth']} | " + " | ".join(cells) + f" | {ratio} |")
    if result.get("baseline"):
        lines += ["", f"Baseline case (scaling = TG over the same engine's TG in it): {result['baseline']}."]
    if result.get("copy_tbs"):
        lines += ["", f"Read rate: the weight and KV bytes a token reads (under -sm: rank 0's part, per GPU) over "
                      f"its time, as a fraction of the device copy rate {result['copy_tbs']} TB/s (read + write) "
                      "measured on the same machine in the same session."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["cases"])
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = result["cases"][case]
        for e in ENGINES:
            pts = [(r["depth"] / 1024, r[e]) for r in rows if r.get(e)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[e], color=COLORS[e])  # one colour per engine
        ax.set_title(case)
        ax.set_xlabel("depth (k tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    what = result.get("metric", "tg").upper()
    axes[0][0].set_ylabel(f"{what} t/s")
    axes[0][0].legend()
    fig.suptitle(f"{what}, same GGUF and GPU: {result['environment'].get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glmtg", nargs="+", required=True, metavar="CASE=JSON", help="glmtg sweep-bench -o outputs")
    ap.add_argument("--mainline", nargs="*", metavar="CASE=TXT", help="llama-bench markdown outputs")
    ap.add_argument("--ik", nargs="*", metavar="CASE=TXT", help="llama-sweep-bench outputs")
    ap.add_argument("--note", default="", help="a line for the table's header (how the runs were made)")
    ap.add_argument("--metric", choices=("tg", "pp"), default="tg",
                    help="token generation (default) or prompt processing; llama-bench tables are TG only")
    ap.add_argument("--copy-tbs", type=float, default=None, metavar="TB/S",
                    help="the device copy rate measured in the same session: adds glmtg's TG read rate as its fraction")
    ap.add_argument("--baseline", metavar="CASE", help="scaling columns: each engine's TG over its TG in CASE "
                    "(e.g. the one-GPU run)")
    ap.add_argument("--commit", help="glmtg commit the runs were made at (overrides the runs' own record)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: STEM.json, STEM.md, STEM.png")
    args = ap.parse_args()
    result = compare(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
