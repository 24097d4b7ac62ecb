"""The fastest plain read of a decode step's KV (or weight) bytes on this GPU: the floor under any attention
kernel and any weight GEMV.

    python bench/stream_floor.py            # -> bench/results/stream_floor/<date>-floor.{json,md,png}

For each byte count (the K+V bytes of a judged case, or one Air weight tensor in Q4_0), a grid of read-only kernels, each timed like
bench/decode_attention.py (calls captured back to back in one CUDA graph, buffers rotated past L2,
median of the replays):
- Triton, one tile per program (the hardware schedules the waves), tiles of 4-32 KB;
- Triton, a fixed number of programs looping over their share (132 to 2112 programs);
- torch.sum over the bytes (the vendor's reduction);
- the best of those followed by an empty second kernel, plainly and with programmatic dependent
  launch (the read kernel lets it launch at once, it waits for the read to finish, as glmtg's merge
  kernel does): the floor of any split-KV design, whose partials need a merge after all slices.
An attention kernel reads the same bytes and does more, so its effective TB/s cannot beat the best
row here. Writes JSON (every trial), a markdown table (best per case) and a bar chart next to it;
``--from-json RUN.json`` rewrites the table and chart of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph, write_json  # noqa: E402

# (label, bytes): K + V of one decode step, batch 1, head_dim 128 (q8_0: 34 bytes per 32 values).
CASES = {
    "12/1 64k bf16": 2 * 1 * 65536 * 128 * 2,
    "12/1 64k q8_0": 2 * 1 * 65536 * 136,
    "96/8 4k bf16": 2 * 8 * 4096 * 128 * 2,
    "96/8 64k q4_0": 2 * 8 * 65536 * 72,
    # GLM-4.5-Air's Q4_0 weights read per decode token (18 bytes per 32 values): the floor under mmvq.
    "Air k_proj q4_0": 1024 * 4096 // 32 * 18,
    "Air q_proj q4_0": 12288 * 4096 // 32 * 18,
    "Air 8 experts q4_0": 8 * 3 * 1408 * 4096 // 32 * 18,
    "Air lm_head q4_0": 151552 * 4096 // 32 * 18,
}


@triton.jit
def _read_tiles(X, Out, n_words, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the second kernel may start (and wait) at once
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n_words, other=0)
    # A data-dependent store the compiler cannot drop; never true for these inputs.
    total = tl.sum(x, 0)
    if total == 123456789:
        tl.store(Out + tl.program_id(0), total)


@triton.jit
def _read_loop(X, Out, n_words, per_prog, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    base = tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per_prog, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc ^= tl.load(X + offs, mask=offs < n_words, other=0)
    total = tl.sum(acc, 0)
    if total == 123456789:
        tl.store(Out + tl.program_id(0), total)


@triton.jit
def _empty(Out, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch), as glmtg's merge is
    if tl.program_id(0) == -1:
        tl.store(Out, 0)


def report(payload: dict, out: Path) -> None:
    """Markdown table (best plain read per case, and the two-kernel floors) and a bar chart beside ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env, results = payload["environment"], payload["results"]
    cases = list(dict.fromkeys(r["case"] for r in results))
    lines = [f"# Read floor: {env.get('device', '')}, copy bandwidth {env['copy_bandwidth_tbps']:.2f} TB/s, "
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}", "",
             "| case | MB | best plain read | µs | TB/s | of copy | + empty second kernel, µs (TB/s) "
             "| + the same with PDL, µs (TB/s) |", "|---|---|---|---|---|---|---|---|"]
    bars = []
    for label in cases:
        rows = [r for r in results if r["case"] == label]
        best = min((r for r in rows if "empty" not in r["trial"]), key=lambda r: r["us"])
        # Runs before the PDL variant existed have no such row.
        two, pdl = (next((r for r in rows if r["trial"].endswith(end)), None) for end in ("kernel", "(PDL)"))
        cells = [f"{r['us']:.2f} ({r['tbps']:.2f})" if r else "—" for r in (two, pdl)]
        lines.append(f"| {label} | {best['bytes'] / 1e6:.1f} | {best['trial']} | {best['us']:.2f} | {best['tbps']:.2f} "
                     f"| {best['frac_copy']:.0%} | {cells[0]} | {cells[1]} |")
        bars.append((label, best["tbps"], two["tbps"] if two else 0.0, pdl["tbps"] if pdl else 0.0))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for i, name in enumerate(("best plain read", "+ empty second kernel", "+ empty second kernel, PDL")):
        ax.bar([x + (i - 1) * width for x in range(len(bars))], [b[i + 1] for b in bars], width, label=name)
    ax.axhline(env["copy_bandwidth_tbps"], color="gray", linestyle="--", linewidth=1, label="copy bandwidth")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("TB/s (bytes read / time)")
    ax.set_title(f"Fastest read of a decode step's KV bytes, {env.get('device', '')}", fontsize=10)
    ax.set_ylim(0, env["copy_bandwidth_tbps"] * 1.25)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(result_path("stream_floor", "floor", ".json")))
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite the .md and .png of an existing run")
    args = parser.parse_args()
    if args.from_json is not None:
        if not args.from_json.is_file():
            parser.error(f"--from-json: no file {args.from_json}")
        report(json.loads(args.from_json.read_text()), args.from_json)
        return 0
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    env = environment()
    copy_bw = copy_bandwidth()
    env["copy_bandwidth_tbps"] = copy_bw / 1e12
    sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    results = []
    for label in args.cases.split(","):
        nbytes = CASES[label]
        n_words = nbytes // 4  # read as int32: 4-byte lanes, 16-byte vector loads
        sets = [torch.randint(-2**30, 2**30, (n_words,), dtype=torch.int32, device="cuda")
                for _ in range(buffers_to_rotate(nbytes))]
        trials = {}
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                grid = (triton.cdiv(n_words, block),)
                trials[f"tiles {block * 4 // 1024} KB, {warps} warps, {grid[0]} programs"] = (
                    lambda x, pdl, g=grid, b=block, w=warps: _read_tiles[g](x, sink, n_words, BLOCK=b, PDL=pdl,
                                                                              num_warps=w))
        for progs in (132, 264, 528, 1056, 2112):
            for block, warps in ((1024, 4), (2048, 8)):
                per = triton.cdiv(triton.cdiv(n_words, progs), block) * block
                trials[f"loop, {progs} programs, {block * 4 // 1024} KB steps, {warps} warps"] = (
                    lambda x, pdl, p=progs, b=block, w=warps, per=per: _read_loop[(p,)](
                        x, sink, n_words, per, BLOCK=b, PDL=pdl, num_warps=w))
        trials["torch.sum"] = lambda x, pdl: x.sum()
        timed = []
        for name, read in trials.items():
            seconds = time_graph([lambda x=x: read(x, False) for x in sets])
            timed.append((seconds, name, read))
            row = dict(case=label, bytes=nbytes, trial=name, us=seconds * 1e6, tbps=nbytes / seconds / 1e12,
                       frac_copy=nbytes / seconds / copy_bw)
            results.append(row)
            print(f"{label:<14} {name:<48} {row['us']:7.2f} us {row['tbps']:5.2f} TB/s", flush=True)
        _, best_name, best_read = min(timed[:-1])  # a Triton read (torch.sum cannot launch dependents)
        # The same read plus an empty kernel after it: what a split-KV call with its merge cannot beat.
        for pdl in (False, True):
            second = (lambda: _empty[(132,)](sink, PDL=True, launch_pdl=True)) if pdl else (lambda: _empty[(132,)](sink))
            calls = [c for x in sets for c in (lambda x=x: best_read(x, pdl), second)]
            seconds = time_graph(calls) * 2  # time_graph divides by the number of calls
            name = f"{best_name} + empty second kernel" + (" (PDL)" if pdl else "")
            results.append(dict(case=label, bytes=nbytes, trial=name, us=seconds * 1e6,
                                tbps=nbytes / seconds / 1e12, frac_copy=nbytes / seconds / copy_bw))
            print(f"{label:<14} {name:<48} {seconds * 1e6:7.2f} us {nbytes / seconds / 1e12:5.2f} TB/s", flush=True)
        del sets
        torch.cuda.empty_cache()
    out = Path(args.out)
    payload = {"environment": env, "method": __doc__, "results": results}
    write_json(out, payload)
    report(payload, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
