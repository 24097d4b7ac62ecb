"""Builds glmtg/cpu/moe_kernel.c at first use with the host's C compiler and loads it with ctypes.

- Compiler: $CC, else ``gcc``. Flags: ``-O3 -march=native -fopenmp`` (the compiler vectorizes the plain-C
  inner loops for the building machine: AVX2 or AVX-512); where the compiler rejects -march=native, the
  same without it.
- Cache: $GLMTG_CACHE, else ~/.cache/glmtg. The file name hashes the source, the compiler, the flags and
  the CPU's model and flags, so a cache shared between machines (a network home) never hands one machine
  another's -march=native build. Written to a temporary name and renamed: concurrent first uses are safe.
- ``kernel_library()`` returns the loaded library or None when there is no compiler or the build fails;
  each such (compiler, cache) is tried once per process and reported by one RuntimeWarning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("moe_kernel.c")
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-fopenmp", "-shared", "-fPIC"),
)


def cache_dir() -> Path:
    """Where built kernels live: $GLMTG_CACHE, else ~/.cache/glmtg."""
    env = os.environ.get("GLMTG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "glmtg"


def _cpu_signature() -> str:
    """The CPU model and feature flags (what -march=native builds for); the platform name elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.glmtg_cpu_moe.argtypes = [p, i, i, i, i, i, p, p, p, p, p, i, i, i, p]
    lib.glmtg_cpu_moe.restype = ctypes.c_int
    return lib


@functools.cache
def _load(cc: str, where: str) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load the kernel with compiler ``cc`` under ``where``; None and one
    RuntimeWarning where that fails."""
    compiler = shutil.which(cc)
    if compiler is None:
        warnings.warn(f"glmtg.cpu: no C compiler {cc!r} found; the CPU experts run on the slower torch path "
                      "(install gcc for the compiled kernel)", RuntimeWarning, stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        path = Path(where) / f"moe_kernel-{key}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
                os.close(fd)
                try:
                    run = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
                                         check=False, capture_output=True, text=True, timeout=300)
                    if run.returncode != 0:
                        errors.append(f"{' '.join(flags)}: {run.stderr.strip()[-500:]}")
                        continue
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return _declare(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
    warnings.warn("glmtg.cpu: building the CPU expert kernel failed; the CPU experts run on the slower torch "
                  "path. " + " | ".join(errors), RuntimeWarning, stacklevel=3)
    return None


def kernel_library() -> ctypes.CDLL | None:
    """The compiled CPU expert kernel for the current $CC and cache directory, or None (see the module
    docstring)."""
    return _load(os.environ.get("CC") or "gcc", str(cache_dir()))
