"""The sum across GPUs that `-sm graph` runs twice per layer, at decode sizes, inside a CUDA graph.

At batch 1 a GLM4-MoE layer all-reduces [1, hidden] activations twice (after o_proj and after the MoE): a
few KB, so the cost is latency, not bandwidth. This times, per message size (rows x hidden, bf16):

- ``nccl``: torch.distributed.all_reduce (NCCL, NVLink multicast off as the machines require);
- ``one_shot``: torch's symmetric-memory one-shot all-reduce (every rank reads every peer's buffer over
  NVLink and sums; no multicast), when this torch has it;
- ``two_shot``: the symmetric-memory reduce-scatter + all-gather, where it exists;

each captured ``--calls`` times back to back in one CUDA graph, replayed, median and min time per call over
the replays (events). Every result is checked against the exact sum (each rank adds rank-distinct small
integers, exact in bf16). Rank 0 writes JSON / MD / PNG under results/allreduce/.

    python bench/allreduce.py --gpus 2 [--hidden 4096 5120] [--rows 1 2 4 8 16 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common import environment, result_path, write_reports  # noqa: E402


def _expected(rows: int, hidden: int, world: int, device: torch.device) -> torch.Tensor:
    base = torch.arange(rows * hidden, device=device).reshape(rows, hidden) % 7
    return sum((base + r).to(torch.bfloat16).float() for r in range(world))


def _fill(x: torch.Tensor, rank: int) -> None:
    rows, hidden = x.shape
    x.copy_((torch.arange(rows * hidden, device=x.device).reshape(rows, hidden) % 7 + rank).to(x.dtype))


def _methods(rank: int, world: int, rows: int, hidden: int, device: torch.device) -> dict:
    """name -> (buffer, call) for every method this torch offers."""
    out = {}
    buf = torch.empty(rows, hidden, dtype=torch.bfloat16, device=device)
    out["nccl"] = (buf, lambda b=buf: dist.all_reduce(b))
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group_name = dist.group.WORLD.group_name
        symm_mem.enable_symm_mem_for_group(group_name)
        for name, op in (("one_shot", "one_shot_all_reduce"), ("two_shot", "two_shot_all_reduce_")):
            if not hasattr(torch.ops.symm_mem, op):
                continue
            sbuf = symm_mem.empty(rows, hidden, dtype=torch.bfloat16, device=device)
            symm_mem.rendezvous(sbuf, group_name)
            if name == "one_shot":
                res = torch.empty_like(sbuf)
                call = (lambda s=sbuf, r=res: torch.ops.symm_mem.one_shot_all_reduce_out(s, "sum", group_name, r))
                out[name] = (sbuf, call, res)
            else:
                out[name] = (sbuf, lambda s=sbuf: torch.ops.symm_mem.two_shot_all_reduce_(s, "sum", group_name))
    except Exception as e:  # an older torch or no NVLink peer access: NCCL alone
        if rank == 0:
            print(f"symmetric memory unavailable: {type(e).__name__}: {e}")
    return out


def _time(call, calls: int, replays: int, stream: torch.cuda.Stream) -> float:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(calls):
                call()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times), min(times)


def _rank(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world, device_id=device)
    dist.all_reduce(torch.ones(1, device=device))  # the communicator exists before any capture
    stream = torch.cuda.Stream()
    rows_out = []
    for hidden in args.hidden:
        for rows in args.rows:
            row = {"hidden": hidden, "rows": rows, "bytes": rows * hidden * 2}
            want = _expected(rows, hidden, world, device)
            for name, entry in _methods(rank, world, rows, hidden, device).items():
                buf, call = entry[0], entry[1]
                got_buf = entry[2] if len(entry) > 2 else buf
                try:
                    _fill(buf, rank)
                    torch.cuda.synchronize()
                    dist.barrier()
                    with torch.cuda.stream(stream):
                        call()
                    torch.cuda.synchronize()
                    ok = bool(torch.equal(got_buf.float(), want))
                    us, best = _time(call, args.calls, args.replays, stream)
                    row[name] = {"us": us, "min_us": best, "exact": ok}
                except Exception as e:
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows_out.append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        payload = {"environment": environment(), "world_size": world, "calls_per_graph": args.calls,
                   "replays": args.replays, "rows": rows_out}
        stem = Path(args.out) if args.out else result_path("allreduce", f"h200x{world}")
        write_reports(payload, stem, _markdown, _plot)
    dist.barrier()
    dist.destroy_process_group()


def _methods_of(payload: dict) -> list[str]:
    return [m for m in ("nccl", "one_shot", "two_shot") if any(m in r for r in payload["rows"])]


def _markdown(p: dict) -> str:
    methods = _methods_of(p)
    env = p["environment"]
    lines = [f"# All-reduce inside a CUDA graph, {p['world_size']} GPUs ({env.get('device')}, torch "
             f"{env.get('torch')}, {env.get('date')})", "",
             f"µs per call: median (min) over {p['replays']} replays of {p['calls_per_graph']} calls; "
             "`exact` = every element equals the exact sum. A replay's first call also waits for the slowest "
             "rank to start its graph, so the median carries the ranks' host skew / calls; the min is the "
             "lockstep rate.", "",
             "| hidden | rows | KB | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for r in p["rows"]:
        cells = []
        for m in methods:
            c = r.get(m, {})
            cells.append(c["error"][:40] if "error" in c else
                         (f"{c['us']:.2f} ({c.get('min_us', float('nan')):.2f})" + ("" if c["exact"] else " WRONG"))
                         if c else "—")
        lines.append(f"| {r['hidden']} | {r['rows']} | {r['bytes'] / 1024:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for hidden in sorted({r["hidden"] for r in p["rows"]}):
        rs = [r for r in p["rows"] if r["hidden"] == hidden]
        for m in _methods_of(p):
            pts = [(r["bytes"] / 1024, r[m]["us"]) for r in rs if "us" in r.get(m, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{m}, hidden {hidden}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message (KB, bf16)")
    ax.set_ylabel("µs per all-reduce (CUDA graph)")
    ax.set_title(f"All-reduce latency, {p['world_size']} GPUs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--calls", type=int, default=200, help="all-reduces per captured graph")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=None, help="output stem (default results/allreduce/<date>-h200xN)")
    ap.add_argument("--from-json", type=Path, default=None, help="remake STEM.md / STEM.png from a run's JSON (CPU)")
    args = ap.parse_args()
    if args.from_json is not None:
        import json

        stem = Path(args.out) if args.out else args.from_json.with_suffix("")
        write_reports(json.loads(args.from_json.read_text()), stem, _markdown, _plot)
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} CUDA GPUs")
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.gpus, os.path.join(tmp, "store"), args), nprocs=args.gpus, join=True)


if __name__ == "__main__":
    main()
