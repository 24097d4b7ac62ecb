"""The CPU expert kernel as CUDA host nodes (glmtg.cpu.host_node) at GLM-4.5-Air shapes: what a host node
costs beyond the kernel itself (the round trip the issue says is paid per MoE layer, ~45 times per Air token).

    PYTHONPATH=. python bench/host_node.py [--layers 8]   # -> bench/results/cpu_moe/<date>-host-node.json/.md

Needs CUDA. One layer's routed experts in RAM (random blocks, bench/cpu_moe.py's; Air: H 4096, I 1408, 128
experts, top-8, q4_k gate/up + q5_0 down), T = 1, the router's picks a fresh random draw per call from a
pool on the device (so the selected experts come from RAM, not from the last call's cache). Rows, medians:
- kernel: ``cpu_moe`` called from Python on host tensors (perf_counter);
- node, eager: one node queued (copies to pinned memory, host function, copy back), timed with CUDA events
  around it and a sync per call;
- graph: ``--layers`` nodes back to back in one CUDA graph (each its own layer's struct; the picks refreshed
  by a device copy before each replay), per node;
- graph, T = 0: the same with no tokens: the node round trip plus the kernel's empty OpenMP region.
"graph - kernel" is the host-node overhead per layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, write_json  # noqa: E402
from cpu_moe import random_blocks  # noqa: E402

from glmtg.cpu import CPU_FORMATS, cpu_moe, kernel_isa, physical_cores  # noqa: E402
from glmtg.cpu.host_node import HostNode, NodeStaging, node_available, node_inputs  # noqa: E402


def graph_ms(nodes: list[HostNode], x: torch.Tensor, ids: torch.Tensor, pool: torch.Tensor, w: torch.Tensor,
             replays: int) -> float:
    """Median ms per node of a graph holding one call of each node; ``ids`` [L, T, k] refreshed from ``pool``
    before each replay."""
    stream = torch.cuda.Stream()
    inputs = [node_inputs(x, ids[j], w) for j in range(len(nodes))]

    def step() -> None:
        for node, args in zip(nodes, inputs):
            node.queue(*args, torch.cuda.current_stream())

    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for r in range(replays + 3):
        if ids.numel():
            for j, args in enumerate(inputs):
                args[1].copy_(pool[(r * len(nodes) + j) % len(pool)])
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        if r >= 3:
            times.append(start.elapsed_time(stop) / len(nodes))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="host nodes per graph")
    ap.add_argument("--gate-up-fmt", default="q4_k", choices=sorted(CPU_FORMATS))
    ap.add_argument("--down-fmt", default="q5_0", choices=sorted(CPU_FORMATS))
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not node_available():
        sys.exit("error: host nodes need CUDA, a CUDA runtime or driver library and the compiled CPU kernel")
    threads = args.threads or physical_cores()
    h, i, e, k, fgu, fd = args.hidden, args.inter, args.experts, args.topk, args.gate_up_fmt, args.down_fmt
    gen = torch.Generator().manual_seed(0)
    gate, up = random_blocks(fgu, (e, i), h, gen), random_blocks(fgu, (e, i), h, gen)
    down = random_blocks(fd, (e, h), i, gen)
    draws = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(args.calls + 3)])[:, None]  # [n,1,k]
    x, w = torch.randn(1, h, generator=gen), torch.rand(1, k, generator=gen)
    print(f"{e} experts, top-{k}, {fgu} gate/up + {fd} down, {threads} threads, kernel {kernel_isa()}")

    times = []
    for j, ids in enumerate(draws):
        t0 = time.perf_counter()
        cpu_moe(x, gate, up, down, ids, w, fgu, fd, threads=threads)
        if j >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    kernel = statistics.median(times)

    staging = NodeStaging()
    nodes = [HostNode(gate, up, down, CPU_FORMATS[fgu], CPU_FORMATS[fd], staging, threads)
             for _ in range(args.layers)]
    xd, wd, pool = x.cuda(), w.cuda(), draws.cuda()
    times = []
    for j in range(len(pool)):
        xf, slots, wf, out = node_inputs(xd, pool[j], wd)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        nodes[0].queue(xf, slots, wf, out, torch.cuda.current_stream())
        stop.record()
        stop.synchronize()
        if j >= 3:
            times.append(start.elapsed_time(stop))
    eager = statistics.median(times)
    ids = pool[:args.layers].clone() if len(pool) >= args.layers else pool[:1].repeat(args.layers, 1, 1)
    graphed = graph_ms(nodes, xd, ids, pool, wd, args.calls)
    empty = graph_ms(nodes, xd[:0], ids[:, :0], pool, wd[:0], args.calls)
    rows = dict(kernel_ms=kernel, node_eager_ms=eager, graph_ms_per_node=graphed, graph_empty_ms_per_node=empty,
                overhead_ms_per_node=graphed - kernel)
    for name, ms in rows.items():
        print(f"{name:24s} {ms:8.3f} ms")
    out = args.out or result_path("cpu_moe", "host-node", ".json")
    payload = {"environment": {**environment(), "threads": threads, "kernel": kernel_isa()},
               "shape": dict(hidden=h, inter=i, experts=e, topk=k, gate_up_fmt=fgu, down_fmt=fd, tokens=1,
                             layers=args.layers), "results": rows}
    write_json(out, payload)
    lines = [f"# CPU experts as CUDA host nodes ({e} experts, top-{k}, {fgu} + {fd}, T = 1, {threads} threads)",
             "", f"{payload['environment'].get('device')}, torch {payload['environment']['torch']}, "
             f"{payload['environment']['date']}", "", "| row | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} / .md")


if __name__ == "__main__":
    main()
