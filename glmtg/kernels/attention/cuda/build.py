"""Rebuild decode_quant.fatbin from decode_quant.cu with nvcc:
``python -m glmtg.kernels.attention.cuda.build``.

sm_90 machine code only (Hopper; PTX for other GPUs would double the file and is untested). The fatbin is
committed with the sha256 of the source it came from; a CPU test checks that the two agree.

For launch sweeps, ``--out PATH -D NAME=VALUE ...`` builds a variant elsewhere (the shipped fatbin and its
stamp stay as they are); bench/cuda_variants.py times such variants side by side.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from glmtg.kernels.attention.cuda_loop import FATBIN, SOURCE, STAMP, source_digest

NVCC_FLAGS = ["-std=c++17", "-O3", "-Xfatbin", "-compress-all", "-Xptxas", "-v",
              "-gencode=arch=compute_90,code=sm_90"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write a variant here instead of the shipped fatbin")
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                        help="preprocessor definition of a variant (needs --out)")
    args = parser.parse_args(argv)
    if args.defines and args.out is None:
        print("error: -D builds a variant: give --out too", file=sys.stderr)
        return 2
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("error: nvcc not found on PATH", file=sys.stderr)
        return 2
    out = args.out or FATBIN
    cmd = [nvcc, *NVCC_FLAGS, *[f"-D{d}" for d in args.defines], "-fatbin", "-o", str(out), str(SOURCE)]
    print(" ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        return result.returncode
    if args.out is None:
        STAMP.write_text(source_digest() + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
