"""Every decode-attention variant compiles for the H100 (sm_90), on any machine.

The Triton interpreter runs the CPU tests but accepts code the GPU compiler rejects (it ran an early
`return` inside a constexpr branch that the compiler refuses). Compiling to PTX and cubin needs no
GPU, so CI checks it, in a subprocess because the interpreter replaces the kernels in this one.
The report also shows the properties the kernel's speed rests on, checked here: the bf16 loop is
software-pipelined (async copies of K and V) and every variant's dots use the tensor cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "inspect_kernel.py"


def test_every_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"a variant failed to compile for sm_90:\n{done.stdout}\n{done.stderr[-3000:]}"
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) >= 9, done.stdout
    for cells in rows:
        name, async_copies, mma, wgmma = cells[0].strip(), int(cells[2]), int(cells[6]), int(cells[7])
        assert mma + wgmma > 0, f"{name}: the dots must lower to tensor-core instructions"
        if name == "bf16/bf16":
            assert async_copies >= 4, f"{name}: K and V tiles must be prefetched ({async_copies} async copies)"
