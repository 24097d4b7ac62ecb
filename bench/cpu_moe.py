"""The CPU expert kernel (glmtg.cpu.cpu_moe) at GLM-4.5-Air shapes, against the host's read bandwidth.

    PYTHONPATH=. python bench/cpu_moe.py        # -> bench/results/cpu_moe/<date>-air.json, table on stdout

One MoE layer's routed experts in RAM (default: Air, H 4096, I 1408, 128 experts, top-8; Q4_K_M's formats:
q4_k gate/up, q5_0 down, llama.cpp's fallback for rows of 1408), random blocks with modest fp16 scales.
Each call routes T tokens to random experts (a fresh draw per call, so the 8 experts' ~83 MB come from RAM,
not the last call's cache), timed with perf_counter; the median over the calls is reported with the
expert bytes the call must read (each distinct selected expert's gate, up and down once) as GB/s.

Host read bandwidth, STREAM-style and measured the same way (median of timed reads of a large array,
bigger than the caches): numpy sum over a 1 GiB float64 array, in one thread and split over the kernel's
threads (numpy releases the GIL in the reduction). "of host" is the kernel's GB/s over the threaded rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, write_json  # noqa: E402

from glmtg.cpu import CPU_FORMATS, cpu_moe, kernel_isa, physical_cores  # noqa: E402
from glmtg.formats import REGISTRY  # noqa: E402

SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,), "q5_1": (0, 2),
                 "iq4_nl": (0,)}


def random_blocks(fmt: str, shape: tuple[int, ...], width: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [*shape, row bytes]: random codes, each fp16 scale field a modest normal number (no NaN/Inf,
    no subnormals: the timings are of ordinary weights)."""
    f = REGISTRY[fmt]
    nb = int(np.prod(shape)) * (width // f.block_size)
    raw = torch.randint(0, 256, (nb, f.type_size), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(nb, generator=gen) * 0.01 + 0.005).to(torch.float16).view(torch.uint8).view(nb, 2)
    for off in SCALE_OFFSETS[fmt]:
        raw[:, off:off + 2] = scales
    return raw.view(*shape, f.blocks_bytes(width))


def host_read_gbps(threads: int, nbytes: int = 2**30, reps: int = 7) -> float:
    """Median GB/s of a numpy sum over ``nbytes`` of float64, split over ``threads`` threads."""
    a = np.random.default_rng(0).random(nbytes // 8)
    parts = np.array_split(a, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # warm: pages touched, threads started
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            times.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--gate-up-fmt", default="q4_k", choices=sorted(CPU_FORMATS))
    ap.add_argument("--down-fmt", default="q5_0", choices=sorted(CPU_FORMATS))
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    h, i, e, k = args.hidden, args.inter, args.experts, args.topk

    gen = torch.Generator().manual_seed(0)
    gate = random_blocks(args.gate_up_fmt, (e, i), h, gen)
    up = random_blocks(args.gate_up_fmt, (e, i), h, gen)
    down = random_blocks(args.down_fmt, (e, h), i, gen)
    per_expert = (gate[0].numel() + up[0].numel() + down[0].numel())
    print(f"experts: {e} x {per_expert / 1e6:.2f} MB ({args.gate_up_fmt} gate/up, {args.down_fmt} down), "
          f"{threads} threads, kernel: {kernel_isa()}")

    stream1 = host_read_gbps(1)
    stream = host_read_gbps(threads)
    print(f"host read (numpy sum, 1 GiB): {stream1:.1f} GB/s in 1 thread, {stream:.1f} GB/s in {threads}")

    rows = []
    for t in args.tokens:
        x = torch.randn(t, h, generator=gen)
        weights = torch.rand(t, k, generator=gen)
        draws = [torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) for _ in range(args.calls + 3)]
        for ids in draws[:3]:  # warm: the kernel built and loaded, its threads started
            cpu_moe(x, gate, up, down, ids, weights, args.gate_up_fmt, args.down_fmt, threads=threads)
        times, nbytes = [], []
        for ids in draws[3:]:
            t0 = time.perf_counter()
            cpu_moe(x, gate, up, down, ids, weights, args.gate_up_fmt, args.down_fmt, threads=threads)
            times.append(time.perf_counter() - t0)
            nbytes.append(len(torch.unique(ids)) * per_expert)
        sec = statistics.median(times)
        gbps = statistics.median(n / s for n, s in zip(nbytes, times)) / 1e9
        rows.append(dict(tokens=t, ms=sec * 1e3, expert_mb=statistics.median(nbytes) / 1e6, gbps=gbps,
                         of_host=gbps / stream))
        print(f"T={t:3d}: {sec * 1e3:8.2f} ms/call, {statistics.median(nbytes) / 1e6:7.1f} MB of experts, "
              f"{gbps:6.1f} GB/s = {100 * gbps / stream:5.1f}% of host read")

    out = args.out or result_path("cpu_moe", "air", ".json")
    payload = {"environment": {**environment(), "threads": threads, "kernel": kernel_isa(), "host_read_gbps": stream,
                               "host_read_gbps_1thread": stream1},
               "shape": dict(hidden=h, inter=i, experts=e, topk=k, gate_up_fmt=args.gate_up_fmt,
                             down_fmt=args.down_fmt), "results": rows}
    write_json(out, payload)
    _write_md_png(out, payload)
    print(f"wrote {out} / .md / .png")


def _write_md_png(out: Path, payload: dict) -> None:
    """The run as a markdown table and a bar chart of GB/s against the host read rate, next to the JSON."""
    env, shape, rows = payload["environment"], payload["shape"], payload["results"]
    title = (f"CPU expert kernel ({env['kernel']}, {env['threads']} threads), {shape['experts']} experts, "
             f"top-{shape['topk']}, {shape['gate_up_fmt']} gate/up + {shape['down_fmt']} down")
    lines = [f"# {title}", "", f"{env['device']}, torch {env['torch']}, {env['date']}; host read "
             f"{env['host_read_gbps']:.1f} GB/s ({env['host_read_gbps_1thread']:.1f} in one thread)", "",
             "| tokens | ms / call | expert MB read | GB/s | of host read |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['ms']:.2f} | {r['expert_mb']:.1f} | {r['gbps']:.1f} | {100 * r['of_host']:.0f} % |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(r["tokens"]) for r in rows], [r["gbps"] for r in rows], label="cpu_moe")
    ax.axhline(env["host_read_gbps"], color="k", linestyle="--", label="host read (numpy sum)")
    ax.set_xlabel("tokens per call")
    ax.set_ylabel("GB/s of expert bytes")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
