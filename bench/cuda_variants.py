"""Build variants of the CUDA decode loop for quantized caches, timed side by side in one process.

    python -m glmtg.kernels.attention.cuda.build --out build/v/pf4.fatbin -D GLMTG_PREFETCH_TILES=4
    python bench/cuda_variants.py --variants shipped,pf4=build/v/pf4.fatbin,pf4-l1=build/v/pf4.fatbin@0 \
        --cases 96/8:65536,12/1:65536 --formats q4_0,q8_0   # -> bench/results/cuda_variants/<date>-variants.json

A variant is NAME[=FATBIN][@CARVEOUT] (FATBIN defaults to the shipped one; CARVEOUT is the percent of
on-chip memory preferred as shared memory, -1 for the driver's choice). Every case and format gets one
set of rotated KV buffers, the Triton plan's time, then each variant's time with the loop's default
slicing (cuda_loop_launch), in --rounds interleaved rounds so that drift shows. Each launch's output is
checked against torch attention over the dequantized cache. Timing as in bench/decode_attention.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, write_json  # noqa: E402
from decode_attention import ROW_BYTES, make_quant_set  # noqa: E402
from quant_tune import measure_launch, reference_output  # noqa: E402

from glmtg.kernels.attention import cuda_loop, cuda_loop_launch, plan_launch  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, int | None]:
    name, _, rest = text.partition("=")
    path_text, _, carveout = (rest or str(cuda_loop.FATBIN)).partition("@")
    if "@" in name:
        name, _, carveout = name.partition("@")
    if not name or (carveout and not carveout.lstrip("-").isdigit()):
        raise ValueError(f"--variants wants NAME[=FATBIN][@CARVEOUT] with an integer CARVEOUT, got {text!r}")
    return name, Path(path_text), int(carveout) if carveout else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="comma list of NAME[=FATBIN][@CARVEOUT]")
    parser.add_argument("--cases", default="96/8:65536")
    parser.add_argument("--formats", default="q4_0,q8_0,fp8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(result_path("cuda_variants", "variants", ".json")))
    args = parser.parse_args()
    try:
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    for name, path, _ in variants:
        if not path.is_file():
            parser.error(f"variant {name}: no fatbin at {path}")
    drivers = {name: cuda_loop.Driver(path.read_bytes(), cuda_loop.CARVEOUT if carveout is None else carveout)
               for name, path, carveout in variants}
    env = environment()
    copy_bw = copy_bandwidth()
    env["copy_bandwidth_tbps"] = copy_bw / 1e12
    env["variants"] = {name: dict(fatbin=str(path), carveout=carveout) for name, path, carveout in variants}
    results = []
    for item in args.cases.split(","):
        heads, ctx = item.split(":")
        hq, hkv, ctx = int(heads.split("/")[0]), int(heads.split("/")[1]), int(ctx)
        for fmt in args.formats.split(","):
            nbytes = 2 * hkv * ctx * ROW_BYTES[fmt](128)
            sets = [make_quant_set(1, hq, hkv, ctx, 128, fmt) for _ in range(buffers_to_rotate(nbytes))]
            device = sets[0][0].device
            want = reference_output(sets[0], fmt)
            trials = [("triton", None, plan_launch(1, hkv, hq // hkv, 128, ctx, device, cache_format=fmt))]
            trials += [(name, name, cuda_loop_launch(1, hkv, ctx, device, rows=hq // hkv)) for name, _, _ in variants]
            for round_ in range(args.rounds):
                for name, driver, launch in trials:
                    if driver is not None:
                        cuda_loop.use_driver(drivers[driver])
                    try:
                        entry = measure_launch(sets, fmt, launch, want, nbytes, copy_bw)
                    except ValueError as exc:  # e.g. more than 16 rows per KV head: outside the loop's scope
                        print(f"{hq}/{hkv} {ctx:>6} {fmt:<5} {name:<12} not run: {exc}", flush=True)
                        break
                    results.append(dict(hq=hq, hkv=hkv, ctx=ctx, format=fmt, variant=name, round=round_,
                                        launch=asdict(launch), **entry))
                    shown = f"{entry['us']:7.1f} us {entry['tbps']:5.2f} TB/s" if entry["us"] else entry["note"]
                    print(f"{hq}/{hkv} {ctx:>6} {fmt:<5} r{round_} {name:<12} {shown}", flush=True)
            del sets
            torch.cuda.empty_cache()
    write_json(Path(args.out), {"environment": env, "method": __doc__, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
