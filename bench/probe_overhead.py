"""Where the fixed cost of a decode-attention call goes (H100 diagnostics, JSON + printed table).

    python bench/probe_overhead.py          # -> bench/results/probe_overhead/<date>-fixed-cost.json

Measures, each in a CUDA graph over rotated buffers like bench/decode_attention.py:
- the cost of one graph node (an empty Triton kernel on 132 / 264 programs);
- the streaming floor: one Triton kernel that only reads the same bytes as the attention call;
- glmtg's call split into the attention kernel alone (merge replaced by nothing) and the whole call;
- a few launch shapes for the cases whose fixed cost decides the judged numbers (12/1 64k, 96/8 4k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph, write_json  # noqa: E402

from glmtg.kernels.attention import launch as da  # noqa: E402  (the launcher module: its merge kernel is swapped below)


@triton.jit
def _empty(Out):
    if tl.program_id(0) == -1:
        tl.store(Out, 0.0)


@triton.jit
def _stream_read(X, Out, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, per_prog, BLOCK):
        acc += tl.load(X + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc))


class _NoMerge:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(result_path("probe_overhead", "fixed-cost", ".json")))
    args = parser.parse_args()
    env = environment()
    copy_bw = copy_bandwidth()
    results: dict = {"environment": env, "copy_tbps": copy_bw / 1e12, "rows": []}

    def record(name: str, seconds: float, nbytes: int = 0) -> None:
        row = {"name": name, "us": seconds * 1e6}
        if nbytes:
            row["tbps"] = nbytes / seconds / 1e12
        results["rows"].append(row)
        print(f"{name:<60} {seconds * 1e6:8.2f} us" + (f"  {row['tbps']:.2f} TB/s" if nbytes else ""), flush=True)

    sink = torch.zeros(1024, device="cuda")
    for progs in (132, 264):
        record(f"empty kernel, {progs} programs", time_graph([lambda p=progs: _empty[(p,)](sink)] * 64))

    for nbytes in (16_777_216, 33_554_432, 268_435_456):
        n = nbytes // 2
        for progs, block, warps in ((132, 8192, 8), (264, 8192, 8), (132, 16384, 8), (528, 4096, 4)):
            per = n // progs // block * block
            sets = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(buffers_to_rotate(nbytes))]
            calls = [lambda x=x: _stream_read[(progs,)](x, sink, per, BLOCK=block, num_warps=warps) for x in sets]
            record(f"stream read {nbytes / 2**20:.0f} MiB, {progs} progs, block {block}", time_graph(calls),
                   per * progs * 2)
            del sets
    torch.cuda.empty_cache()

    cases = [(1, 65536, 12, 1), (1, 4096, 96, 8), (1, 65536, 96, 8), (1, 4096, 12, 1), (1, 131072, 12, 1)]
    for batch, ctx, hq, hkv in cases:
        nbytes = 2 * batch * hkv * ctx * 128 * 2
        sets = []
        for _ in range(buffers_to_rotate(nbytes)):
            q = torch.randn(batch, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, hkv, ctx, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sets.append((q, k, v, torch.full((batch,), ctx, dtype=torch.int32, device="cuda")))
        rows = hq // hkv
        base = da.plan_launch(batch, hkv, rows, 128, ctx, sets[0][0].device)
        variants = {"default": {}}
        if (hq, hkv, ctx) in ((12, 1, 65536), (96, 8, 4096)):
            for splits in (33, 66, 132, 264):
                for block_n, stages in ((64, 3), (64, 4), (128, 2), (128, 3)):
                    variants[f"splits {splits} block_n {block_n} stages {stages}"] = dict(
                        num_splits=splits, block_n=block_n, num_stages=stages)
            variants["default warps 8"] = dict(num_warps=8)
            variants["default no pdl"] = dict(pdl=False)
        for label, kw in variants.items():
            launch = da.plan_launch(batch, hkv, rows, 128, ctx, sets[0][0].device, **kw) if kw else base
            outs = [torch.empty_like(s[0]) for s in sets]
            calls = [lambda s=s, o=o: da.decode_attention(*s, out=o, validate=False, launch=launch)
                     for s, o in zip(sets, outs)]
            tag = f"{hq}/{hkv} ctx {ctx} {label} (splits {launch.num_splits}, bn {launch.block_n})"
            try:
                record(tag, time_graph(calls), nbytes)
                if label == "default":
                    saved = da._merge_splits_kernel
                    da._merge_splits_kernel = _NoMerge()
                    try:
                        record(tag + " attention only", time_graph(calls), nbytes)
                    finally:
                        da._merge_splits_kernel = saved
            except Exception as exc:  # a shape the kernel rejects is reported, not fatal
                print(f"{tag}: {type(exc).__name__}: {exc}"[:200], flush=True)
        del sets
        torch.cuda.empty_cache()
    write_json(Path(args.out), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
