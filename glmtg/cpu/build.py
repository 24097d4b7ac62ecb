"""Builds glmtg/cpu/moe_kernel.c at first use with the host's C compiler and loads it with ctypes.

- Compiler: $CC, else ``gcc``. Flags: ``-O3 -march=$GLMTG_CPU_MARCH -fopenmp``, the target by default
  ``native`` (the building machine: its AVX2 / AVX-512 VNNI paths, moe_kernel.c); a portable target
  (``x86-64``, ``x86-64-v3``) builds a kernel for a cache that other machines share. Where the compiler
  rejects the target, the same flags without -march (the compiler's default target).
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
HEADERS = ("dots_scalar.h", "dots_avx2.h")  # included by SOURCE: part of the cache key
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


def cache_dir(env: str | None = None) -> Path:
    """Where built kernels live: ``env`` (default $GLMTG_CACHE), else ~/.cache/glmtg."""
    env = os.environ.get("GLMTG_CACHE") if env is None else env
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
    lib.glmtg_cpu_moe_isa.argtypes = []
    lib.glmtg_cpu_moe_isa.restype = ctypes.c_char_p
    lib.glmtg_cpu_moe_node.argtypes = [p]
    lib.glmtg_cpu_moe_node.restype = None
    lib.glmtg_cpu_moe_node_layout.argtypes = [p, i]
    lib.glmtg_cpu_moe_node_layout.restype = ctypes.c_int
    return lib


@functools.cache
def _load(cc: str, cache_env: str, march: str) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load the kernel with compiler ``cc`` for target ``march`` under
    cache_dir(cache_env); None and one RuntimeWarning where that fails."""
    where = cache_dir(cache_env)
    compiler = shutil.which(cc)
    if compiler is None:
        warnings.warn(f"glmtg.cpu: no C compiler {cc!r} found; the CPU experts run on the slower torch path "
                      "(install gcc for the compiled kernel)", RuntimeWarning, stacklevel=3)
        return None
    source = b"\0".join(p.read_bytes() for p in (SOURCE, *(SOURCE.with_name(h) for h in HEADERS)))
    errors = []
    for flags in ((f"-march={march}", *BASE_FLAGS), BASE_FLAGS):
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        path = where / f"moe_kernel-{key}.so"
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
    # keyed by the raw variables: this runs once per layer call, and resolving the home directory would
    # cost more than the lookup
    env = os.environ
    return _load(env.get("CC") or "gcc", env.get("GLMTG_CACHE") or "", env.get("GLMTG_CPU_MARCH") or "native")


def kernel_isa() -> str:
    """Which row dot products the loaded kernel uses: "avx2+avx512vnni", "avx2" or "scalar" (plain C), or
    "torch" where there is no compiled kernel."""
    lib = kernel_library()
    return "torch" if lib is None else lib.glmtg_cpu_moe_isa().decode()
