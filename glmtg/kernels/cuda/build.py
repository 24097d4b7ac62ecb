"""Rebuild decode_quant.fatbin from decode_quant.cu with nvcc: ``python -m glmtg.kernels.cuda.build``.

sm_90 machine code only (Hopper; PTX for other GPUs would double the file and is untested). The fatbin is
committed with the sha256 of the source it came from; a CPU test checks that the two agree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from glmtg.kernels.decode_quant_cuda import FATBIN, SOURCE, STAMP, source_digest

NVCC_FLAGS = ["-std=c++17", "-O3", "-Xfatbin", "-compress-all", "-Xptxas", "-v",
              "-gencode=arch=compute_90,code=sm_90"]


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("error: nvcc not found on PATH", file=sys.stderr)
        return 2
    cmd = [nvcc, *NVCC_FLAGS, "-fatbin", "-o", str(FATBIN), str(SOURCE)]
    print(" ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        return result.returncode
    STAMP.write_text(source_digest() + "\n")
    print(f"wrote {FATBIN} ({FATBIN.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
