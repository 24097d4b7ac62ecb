"""Put two runs of one benchmark side by side: a "before" and an "after" of the same cases.

Reads two results JSONs written by ``bench/decode_attention.py`` (rows keyed by heads, batch,
context and implementation; time in us, lower is better) or by ``glmtg sweep-bench -o`` (rows keyed
by N_KV; S_PP and S_TG in t/s, higher is better) and writes, next to ``--out``, a markdown table,
a JSON and a PNG of after/before per case, with the worst deviation in either direction. A
refactor that must leave speed unchanged is judged by that worst deviation (``--tolerance``,
default 3 %); the exit code is 1 where a case is outside it, so a device script can say so.

    python bench/ab_compare.py BEFORE.json AFTER.json --out bench/results/refactor/2026-11-28-decode
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _kind(payload: dict[str, Any]) -> str:
    if payload.get("tool") == "glmtg sweep-bench":
        return "sweep"
    if "rows" in payload and payload["rows"] and "impl" in payload["rows"][0]:
        return "decode"
    raise ValueError("not a decode_attention or sweep-bench results JSON")


def _decode_pairs(before: dict, after: dict) -> list[dict[str, Any]]:
    def keyed(payload: dict) -> dict[tuple, float]:
        return {(r["hq"], r["hkv"], r["batch"], r["ctx"], r["impl"]): r["us"]
                for r in payload["rows"] if r.get("us")}

    a, b = keyed(before), keyed(after)
    pairs = []
    for key in a.keys() & b.keys():
        hq, hkv, batch, ctx, impl = key
        # time: after / before > 1 is slower; speed ratio = before / after
        pairs.append({"case": f"{hq}/{hkv} B={batch} ctx={ctx}", "impl": impl, "before": a[key],
                      "after": b[key], "unit": "us", "speed_ratio": a[key] / b[key],
                      "order": (impl, hq, hkv, batch, ctx)})
    return sorted(pairs, key=lambda p: p["order"])


def _sweep_pairs(before: dict, after: dict) -> list[dict[str, Any]]:
    def keyed(payload: dict) -> dict[int, dict]:
        return {r["n_kv"]: r for r in payload["rows"]}

    a, b = keyed(before), keyed(after)
    pairs = []
    for n_kv in sorted(a.keys() & b.keys()):
        for metric in ("speed_pp", "speed_tg"):
            pairs.append({"case": f"N_KV={n_kv}", "impl": "S_" + metric[len("speed_"):].upper(),
                          "before": a[n_kv][metric], "after": b[n_kv][metric], "unit": "t/s",
                          "speed_ratio": b[n_kv][metric] / a[n_kv][metric], "order": (metric, n_kv)})
    return sorted(pairs, key=lambda p: p["order"])


def compare(before: dict, after: dict) -> list[dict[str, Any]]:
    kind = _kind(before)
    if _kind(after) != kind:
        raise ValueError("the two results files come from different benchmarks")
    pairs = _decode_pairs(before, after) if kind == "decode" else _sweep_pairs(before, after)
    if not pairs:
        raise ValueError("the two results files share no case")
    for p in pairs:
        p.pop("order")
    return pairs


def _describe(env: dict, label: str | None) -> str:
    name = label or env.get("glmtg_commit") or "?"
    return f"{name}, {env.get('date', '?')}, {env.get('device', '?')}"


def markdown(pairs: list[dict[str, Any]], before_env: dict, after_env: dict, tolerance: float,
             labels: tuple[str | None, str | None] = (None, None)) -> str:
    worst = max(pairs, key=lambda p: abs(p["speed_ratio"] - 1))
    lines = [
        f"before: {_describe(before_env, labels[0])}",
        f"after: {_describe(after_env, labels[1])}",
        "",
        f"speed after / before (> 1: faster after). Worst: {worst['speed_ratio']:.3f} "
        f"({worst['case']}, {worst['impl']}); {sum(abs(p['speed_ratio'] - 1) > tolerance for p in pairs)} of "
        f"{len(pairs)} cases outside ±{tolerance:.0%}.",
        "",
        "| case | impl | before | after | unit | speed after/before |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        flag = " **" if abs(p["speed_ratio"] - 1) > tolerance else ""
        lines.append(f"| {p['case']} | {p['impl']} | {p['before']:.2f} | {p['after']:.2f} | {p['unit']} | "
                     f"{p['speed_ratio']:.3f}{flag} |")
    return "\n".join(lines) + "\n"


def plot(pairs: list[dict[str, Any]], path: Path, title: str, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(pairs)), 4))
    ratios = [p["speed_ratio"] for p in pairs]
    ax.bar(range(len(ratios)), ratios, color=["tab:red" if abs(r - 1) > tolerance else "tab:blue" for r in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    for bound in (1 - tolerance, 1 + tolerance):
        ax.axhline(bound, color="gray", ls="--", lw=0.8)
    ax.set_ylim(min(0.9, min(ratios) - 0.02), max(1.1, max(ratios) + 0.02))
    ax.set_ylabel("speed after / before")
    ax.set_xlabel("case (table order)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .md/.json/.png written")
    parser.add_argument("--tolerance", type=float, default=0.03, help="allowed |speed ratio - 1|")
    parser.add_argument("--title", default="after / before")
    parser.add_argument("--labels", nargs=2, metavar=("BEFORE", "AFTER"), default=(None, None),
                        help="names of the two runs (default: the commit each JSON records)")
    args = parser.parse_args(argv)
    try:
        before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
        pairs = compare(before, after)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(pairs, before.get("environment", {}), after.get("environment", {}), args.tolerance,
                    tuple(args.labels))
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"before": str(args.before), "after": str(args.after), "labels": list(args.labels), "before_environment": before.get("environment"),
         "after_environment": after.get("environment"), "tolerance": args.tolerance, "pairs": pairs}, indent=1))
    plot(pairs, args.out.with_suffix(".png"), args.title, args.tolerance)
    print(text)
    return 0 if all(abs(p["speed_ratio"] - 1) <= args.tolerance for p in pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
