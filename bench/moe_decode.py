"""MoE decode micro-benchmark: the routed experts of GLM-4.5-Air for a few tokens, bf16, on CUDA.

    python bench/moe_decode.py                           # -> bench/results/moe_decode/<date>-kernel.json
    python bench/moe_decode.py --sweep --tokens 1 4      # also a grid of block sizes (<date>-blocks-sweep.json)

Implementations: "gathered" is layers.moe.gathered_experts + the fp32 combine (the torch path before the kernel: it
copies the chosen experts' weights out, then reads the copy), "kernel" is glmtg.kernels.moe_decode at its
default blocks; with --sweep, "kernel <blocks>" rows for other block sizes, each also split into its
gate/up and down kernels timed alone.

Time: one call per routing set, all captured back to back in one CUDA graph and replayed (bench/common.py
time_graph), median per call. Each call routes its tokens to other experts (16 sets cycling over all 128),
so the chosen weights (k x 34.6 MB per token) are never served from the 50 MB L2. Effective TB/s counts the
weight bytes of the distinct experts a call must read (k experts at T = 1) over the time, also given as a
fraction of the device's copy bandwidth (read + write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, result_path, time_graph, write_json  # noqa: E402

from glmtg.config import ModelConfig  # noqa: E402
from glmtg.kernels import moe_decode as md  # noqa: E402
from glmtg.layers.moe import Experts, gathered_experts  # noqa: E402

ROUTING_SETS = 16  # calls per graph replay; 16 x 8 = 128: at T = 1 every expert is read once per replay
SWEEP = [  # (block_i, block_k, block_h, block_k_down, num_warps)
    (16, 256, 8, 512, 4), (8, 512, 8, 512, 4), (32, 256, 8, 512, 8), (16, 512, 16, 512, 8),
    (16, 256, 16, 256, 4), (8, 256, 4, 512, 4), (16, 128, 8, 256, 4), (32, 128, 32, 128, 4),
]


def routing_sets(tokens: int, experts: int, top_k: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """ROUTING_SETS ids tensors [T, k]; at T = 1 consecutive sets are disjoint and together cover all experts."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(experts, generator=g)
    sets = []
    for s in range(ROUTING_SETS):
        if tokens == 1 and ROUTING_SETS * top_k <= experts:
            ids = perm[s * top_k:(s + 1) * top_k][None]
        else:  # distinct experts within a token (as top-k gives), overlaps between tokens
            ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        sets.append(ids.to(device))
    return sets


def split_calls(x, experts: Experts, ids, weights, out, block_i, block_k, block_h, block_k_down, num_warps):
    """The two kernels of moe_decode as separate calls (same launches as the launcher makes)."""
    t, k = ids.shape
    e, inter, hidden = experts.gate_proj.shape
    act = torch.empty((t, k, inter), dtype=torch.float32, device=x.device)

    def gate_up():
        md._gate_up_kernel[(t * k, -(-inter // block_i))](
            x, experts.gate_proj, experts.up_proj, ids, act, hidden, inter, e, k,
            BLOCK_I=block_i, BLOCK_K=block_k, num_warps=num_warps)

    def down():
        md._down_kernel[(t, -(-hidden // block_h))](
            act, experts.down_proj, ids, weights, out, hidden, inter, e, k,
            BLOCK_H=block_h, BLOCK_K=block_k_down, num_warps=num_warps)

    return gate_up, down


def run(tokens: int, top_k: int, experts: Experts, copy_bw: float, sweep: bool, replays: int) -> list[dict]:
    e, inter, hidden = experts.gate_proj.shape
    dev, dtype = experts.gate_proj.device, experts.gate_proj.dtype
    expert_bytes = 3 * inter * hidden * experts.gate_proj.element_size()
    g = torch.Generator(device=dev).manual_seed(tokens)
    ids_sets = routing_sets(tokens, e, top_k, dev, seed=tokens)
    xs = [torch.randn(tokens, hidden, generator=g, device=dev).to(dtype) for _ in ids_sets]
    ws = [torch.rand(tokens, top_k, generator=g, device=dev) for _ in ids_sets]
    outs = [torch.empty_like(x) for x in xs]
    distinct = sum(int(ids.unique().numel()) for ids in ids_sets) / len(ids_sets)
    nbytes = distinct * expert_bytes
    rows = []

    def record(impl, seconds, **extra):
        row = dict(tokens=tokens, impl=impl, us=seconds * 1e6, tbps=nbytes / seconds / 1e12,
                   frac_copy=nbytes / seconds / copy_bw, **extra)
        rows.append(row)
        print(f"T={tokens:<2} {impl:<44} {row['us']:8.1f} us {row['tbps']:6.2f} TB/s "
              f"({row['frac_copy']:.0%} of copy)" + (f"  max|diff| {extra['max_abs_diff']:.2e}"
                                                       if "max_abs_diff" in extra else ""), flush=True)

    def gathered(i):
        y = gathered_experts(xs[i], experts.gate_proj, experts.up_proj, experts.down_proj, ids_sets[i])
        return (y.float() * ws[i][..., None]).sum(1).to(xs[i].dtype)

    def old_call(i):
        return lambda: outs[i].copy_(gathered(i))

    record("gathered (torch, before)", time_graph([old_call(i) for i in range(len(ids_sets))], replays))
    want = gathered(0)

    configs = [None] + (SWEEP if sweep else [])
    for cfg in configs:
        names = ("block_i", "block_k", "block_h", "block_k_down", "num_warps")
        kw = {} if cfg is None else dict(zip(names, cfg, strict=True))

        def new_call(i, kw=kw):
            return lambda: md.moe_decode(xs[i], experts.gate_proj, experts.up_proj, experts.down_proj,
                                         ids_sets[i], ws[i], out=outs[i], **kw)

        name = "kernel" if cfg is None else "kernel " + "/".join(map(str, cfg))
        try:
            seconds = time_graph([new_call(i) for i in range(len(ids_sets))], replays)
        except Exception as exc:  # one bad block shape should not end the sweep
            print(f"T={tokens:<2} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        new_call(0)()
        diff = float((outs[0].float() - want.float()).abs().max())
        record(name, seconds, max_abs_diff=diff, config=kw or "default")
        if cfg is not None:  # where the time goes: the gate/up kernel reads 2/3 of the bytes, down 1/3
            parts = [split_calls(xs[i], experts, ids_sets[i], ws[i], outs[i], *cfg) for i in range(len(ids_sets))]
            for j, part in enumerate(("gate_up", "down")):
                s = time_graph([p[j] for p in parts], replays)
                share = (2 / 3, 1 / 3)[j]
                rows.append(dict(tokens=tokens, impl=f"{name} [{part} only]", us=s * 1e6,
                                 tbps=share * nbytes / s / 1e12, frac_copy=share * nbytes / s / copy_bw))
                print(f"T={tokens:<2} {'  ' + part + ' only':<44} {s * 1e6:8.1f} us "
                      f"{share * nbytes / s / 1e12:6.2f} TB/s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default "
                        "bench/results/moe_decode/<date>-kernel.json, <date>-blocks-sweep.json with --sweep)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1], help="tokens per call (T * 8 <= 128)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel block sizes")
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/moe_decode.py times CUDA kernels and needs a CUDA device "
              "(the kernel's correctness tests run on a CPU: tests/kernels/test_moe_decode.py)", file=sys.stderr)
        return 2
    config = ModelConfig.preset("glm-4.5-air")
    if any(t < 1 or t * config.num_experts_per_tok > config.n_routed_experts for t in args.tokens):
        parser.error("every --tokens value must satisfy 1 <= T and T * 8 <= 128 (the decode path)")
    with torch.device("cuda"):
        experts = Experts(config, torch.bfloat16)  # 128 x 3 x 4096 x 1408 x 2 B = 4.4 GB
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in experts.parameters():
        for e in range(p.shape[0]):  # one expert at a time: no 2.9 GB fp32 temporary
            p.data[e].copy_(torch.randn(p.shape[1:], generator=g, device="cuda") * p.shape[-1] ** -0.5)
    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for t in args.tokens:
        rows += run(t, config.num_experts_per_tok, experts, copy_bw, args.sweep, args.replays)
    payload = dict(environment=environment(), copy_tbps=copy_bw / 1e12,
                   shapes=dict(hidden=config.hidden_size, inter=config.moe_intermediate_size,
                               experts=config.n_routed_experts, top_k=config.num_experts_per_tok, dtype="bf16"),
                   routing_sets=ROUTING_SETS, rows=rows)
    out = args.out or result_path("moe_decode", "blocks-sweep" if args.sweep else "kernel", ".json")
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
