"""What ptxas makes of a compiled kernel's PTX for sm_90a: registers, spill stores and global loads.

The compile-check tests run without a GPU; the registers and spills are known only to ptxas (a kernel
object learns them when loaded on a device), so the PTX goes through ptxas -v here."""

from __future__ import annotations

import os
import re
import subprocess

from triton.backends.nvidia.compiler import get_ptxas


def ptxas_report(ptx: str, tag: str) -> dict[str, int]:
    """regs, spills (bytes of spill stores), v4 (16-byte global loads) and loads (all global loads)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{tag}_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(path)
    return dict(regs=int(re.search(r"Used (\d+) registers", log).group(1)),
                spills=int(re.search(r"(\d+) bytes spill stores", log).group(1)),
                v4=ptx.count("ld.global.v4"), loads=ptx.count("ld.global"))


def compile_sm90_report(kernel, types: dict[str, str], const: dict, *, divisible: tuple[str, ...] = (),
                        num_warps: int, tag: str) -> dict[str, int]:
    """Compile a Triton kernel for sm_90 as a launcher would and report it (``ptxas_report``).

    ``types``: the Triton type of each pointer ("*bf16") and float scalar ("fp32"); other parameters are
    int32 scalars, those in ``const`` constexpr (and those with a default, at it). Pointers and the scalars named in ``divisible`` get the
    16-divisibility hint the launcher's real launches specialise on."""
    return ptxas_report(compile_sm90_ptx(kernel, types, const, divisible=divisible, num_warps=num_warps), tag)


def compile_sm90_ptx(kernel, types: dict[str, str], const: dict, *, divisible: tuple[str, ...] = (),
                     num_warps: int) -> str:
    """The PTX of a Triton kernel compiled for sm_90 (arguments as ``compile_sm90_report``)."""
    return compile_sm90(kernel, types, const, divisible=divisible, options=dict(num_warps=num_warps)).asm["ptx"]


def compile_sm90(kernel, types: dict[str, str], const: dict, *, divisible: tuple[str, ...] = (),
                 options: dict):
    """The Triton compile result of ``kernel`` for sm_90 (``.asm["ptx"]``, ``.metadata.shared``); ``options``
    as a launch's (num_warps, num_stages, ...), the rest as ``compile_sm90_report``."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    const = dict(const)
    for i, (name, param) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        if name not in const and name not in types and param.default is not inspect.Parameter.empty:
            const[name] = param.default  # left at its default, as a launch that does not pass it
        sig[name] = "constexpr" if name in const else types.get(name, "i32")
        if sig[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=options)
