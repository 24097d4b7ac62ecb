"""Run one decode-attention configuration a few times, for a profiler (Nsight Compute) to read.

    ncu --kernel-name regex:_decode_attention_kernel --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats python bench/profile_decode.py \\
        --format q8_0 --heads 96/8 --ctx 65536 --block-n 32 --num-warps 1 --ctas-per-sm 8

With ``--cuda-loop`` the launch is the CUDA loop's (kernel names glmtg_decode_quant_*).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import make_quant_set, make_sets  # noqa: E402

from glmtg.kernels.attention import cuda_loop_launch, decode_attention, plan_launch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="q8_0", choices=("bf16", "q8_0", "q4_0", "fp8"))
    parser.add_argument("--heads", default="96/8")
    parser.add_argument("--ctx", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=4)
    for name in ("block-n", "num-warps", "num-stages", "ctas-per-sm"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--cuda-loop", action="store_true", help="the CUDA loop's launch (quantized formats)")
    args = parser.parse_args()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    d = 128
    if args.format == "bf16":
        (q, k, v, lengths), = make_sets(1, hq, hkv, args.ctx, d, torch.bfloat16, 1)
        extra = {}
    else:
        q, k, v, lengths, k_scale, v_scale = make_quant_set(1, hq, hkv, args.ctx, d, args.format)
        extra = dict(k_scale=k_scale, v_scale=v_scale, k_format=args.format, v_format=args.format)
    launch = plan_launch(1, hkv, hq // hkv, d, args.ctx, q.device, block_n=args.block_n, num_warps=args.num_warps,
                         num_stages=args.num_stages, ctas_per_sm=args.ctas_per_sm,
                         cache_format=None if args.format == "bf16" else args.format)
    if args.cuda_loop:
        launch = cuda_loop_launch(1, hkv, args.ctx, q.device, rows=hq // hkv)
    print(launch, flush=True)
    for _ in range(args.calls):
        decode_attention(q, k, v, lengths, validate=False, launch=launch, **extra)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
