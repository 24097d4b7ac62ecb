"""Launch sweep for the quantized cache formats (q8_0, q4_0, fp8) of the decode-attention kernel.

    python bench/quant_tune.py [--out PATH.json] [--cases 96/8:65536,12/1:65536] [--formats q8_0,fp8]

For each case and format: the planner's default launch, the default with the plain (non-asm)
dequantization, then a grid over tile length, pipeline stages, warps and programs per SM. Each launch's
output is checked against torch attention over the dequantized
cache (a launch the compiler gets wrong is reported, not timed). Timing as in
bench/decode_attention.py (CUDA graph, KV sets rotated past L2, median); effective bandwidth counts
the bytes of codes and scales read. JSON only (default bench/results/quant_tune/<date>-sweep.json): the
chosen defaults go into plan_launch and the table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph, write_json  # noqa: E402
from decode_attention import QUANT_FORMATS, gqa_reference, make_quant_set, make_sets  # noqa: E402

from glmtg.formats import FORMATS, KernelCode  # noqa: E402
from glmtg.kernels.attention import cuda_loop, cuda_loop_launch, decode_attention, plan_launch  # noqa: E402

GRID = dict(block_n=(64, 128), num_stages=(2, 3, 4), num_warps=(4, 8), ctas_per_sm=(1, 2, 4))


def reference_output(first_set, fmt) -> torch.Tensor:
    """Attention of the first set over its dequantized cache (fp32 torch), to catch miscompiled launches."""
    q, k, v, lengths, k_scale, v_scale = first_set
    if fmt != "bf16":
        k, v = FORMATS[fmt].dequantize(k, k_scale), FORMATS[fmt].dequantize(v, v_scale)
    return gqa_reference(q[:, 0].float(), k.float(), v.float())


def relative_error(first_set, fmt, launch, want) -> float:
    q, k, v, lengths, k_scale, v_scale = first_set
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, k_format=None if fmt == "bf16" else fmt,
                     v_format=None if fmt == "bf16" else fmt, out=out, validate=False, launch=launch)
    return ((out[:, 0].float() - want).norm() / want.norm()).item()


def time_launch(sets, fmt, launch) -> float:
    calls = []
    for q, k, v, lengths, k_scale, v_scale in sets:
        out = torch.empty_like(q)
        calls.append(lambda q=q, k=k, v=v, lengths=lengths, ks=k_scale, vs=v_scale, out=out: decode_attention(
            q, k, v, lengths, k_scale=ks, v_scale=vs, k_format=None if fmt == "bf16" else fmt,
            v_format=None if fmt == "bf16" else fmt, out=out, validate=False,
            launch=launch))
    return time_graph(calls, replays=30)


def measure_launch(sets, fmt, launch, want, nbytes: int, copy_bw: float) -> dict:
    """Time one launch over the rotated sets and check its output: a results entry (us None and a note
    where the output is wrong)."""
    seconds = time_launch(sets, fmt, launch)
    err = relative_error(sets[0], fmt, launch, want)
    if not err < 2e-2:  # bf16 output and fp16 dots: ~4e-3; a miscompiled tile gives O(1)
        return dict(us=None, note=f"WRONG RESULT (relative error {err:.2e}), {seconds * 1e6:.1f} us")
    return dict(us=seconds * 1e6, tbps=nbytes / seconds / 1e12, frac_copy=nbytes / seconds / copy_bw, rel_err=err)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(result_path("quant_tune", "sweep", ".json")))
    parser.add_argument("--cases", default="96/8:65536,12/1:65536")
    parser.add_argument("--formats", default=",".join(QUANT_FORMATS))
    parser.add_argument("--no-grid", action="store_true", help="default launches only")
    parser.add_argument("--cuda-per-sm", default="",
                        help="also time the CUDA loop (glmtg.kernels.attention.cuda_loop) with these slices per SM, e.g. 4,8,12")
    parser.add_argument("--cuda-min-tokens", default="64",
                        help="shortest slice of those CUDA-loop launches, in tokens (comma list to sweep)")
    parser.add_argument("--block-m", type=int, default=None,
                        help="query rows per tile for every Triton launch (e.g. 16: 48/2's 24 rows in two tiles)")
    for key, values in GRID.items():
        parser.add_argument(f"--{key.replace('_', '-')}", default=",".join(map(str, values)))
    args = parser.parse_args()
    env = environment()
    copy_bw = copy_bandwidth()
    env["copy_bandwidth_tbps"] = copy_bw / 1e12
    results = []
    for item in args.cases.split(","):
        heads, ctx = item.split(":")
        hq, hkv, ctx = int(heads.split("/")[0]), int(heads.split("/")[1]), int(ctx)
        for fmt in args.formats.split(","):
            d = 128
            row_bytes = FORMATS[fmt].row_bytes(d)
            nbytes = 2 * hkv * ctx * row_bytes
            nsets = buffers_to_rotate(nbytes)
            sets = ([(*s, None, None) for s in make_sets(1, hq, hkv, ctx, d, torch.bfloat16, nsets)] if fmt == "bf16"
                    else [make_quant_set(1, hq, hkv, ctx, d, fmt) for _ in range(nsets)])
            rows = hq // hkv
            want = reference_output(sets[0], fmt)
            base = plan_launch(1, hkv, rows, d, ctx, sets[0][0].device, cache_format=fmt, block_m=args.block_m)
            trials = [("default", base)]
            if FORMATS[fmt].code in (KernelCode.Q8_0, KernelCode.Q4_0):  # the asm dequantization applies
                trials.append(("default, plain dequant", replace(base, asm_dequant=False)))
            grid = {key: [int(x) for x in getattr(args, key).split(",")] for key in GRID}
            if not args.no_grid:
                for values in itertools.product(*grid.values()):
                    kw = dict(zip(grid, values))
                    launch = plan_launch(1, hkv, rows, d, ctx, sets[0][0].device, cache_format=fmt,
                                         block_m=args.block_m, **kw)
                    name = " ".join(f"{k}={v}" for k, v in kw.items())
                    trials.append((name, launch))
            device = sets[0][0].device
            if cuda_loop.usable(*sets[0][:3], sets[0][4], sets[0][5], fmt, fmt, None):
                print(f"cuda loop: {cuda_loop.resident_per_sm(device, fmt, fmt)} programs resident per SM",
                      flush=True)
                # The loop's default slicing, for every format (plan_launch takes it for q4_0 only).
                trials.append(("cuda default", cuda_loop_launch(1, hkv, ctx, device, rows=rows)))
                for per_sm, min_tokens in itertools.product(filter(None, args.cuda_per_sm.split(",")),
                                                            args.cuda_min_tokens.split(",")):
                    launch = cuda_loop_launch(1, hkv, ctx, device, rows=rows, warps_per_sm=int(per_sm),
                                              min_tokens_per_split=int(min_tokens))
                    trials.append((f"cuda per_sm={per_sm} min_tokens={min_tokens} splits={launch.num_splits}",
                                   launch))
            for name, launch in trials:
                try:
                    entry = measure_launch(sets, fmt, launch, want, nbytes, copy_bw)
                except Exception as exc:  # e.g. shared memory exceeded for the largest tiles
                    entry = dict(us=None, note=f"{type(exc).__name__}: {str(exc)[:120]}")
                results.append(dict(hq=hq, hkv=hkv, ctx=ctx, format=fmt, trial=name, launch=asdict(launch), **entry))
                shown = f"{entry['us']:8.1f} us {entry['tbps']:5.2f} TB/s" if entry.get("us") else entry["note"]
                print(f"{hq}/{hkv} {ctx} {fmt:<5} {name:<48} {shown}", flush=True)
            timed = [r for r in results if r["format"] == fmt and r["hq"] == hq and r["ctx"] == ctx and r.get("us")]
            if timed:
                best = min(timed, key=lambda r: r["us"])
                print(f"BEST {hq}/{hkv} {ctx} {fmt}: {best['trial']} {best['us']:.1f} us", flush=True)
            else:
                print(f"BEST {hq}/{hkv} {ctx} {fmt}: none (every launch failed or was wrong)", flush=True)
            del sets
            torch.cuda.empty_cache()
    write_json(Path(args.out), {"environment": env, "method": __doc__, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
