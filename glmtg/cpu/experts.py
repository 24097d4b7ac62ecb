"""``cpu_moe``: the routed experts of one MoE layer held in system RAM, in GGUF blocks, in one fused call.

out[t] = Σ_s weights[t, s] · down_e(silu(gate_e x_t) · up_e x_t), e = ids[t, s]; slots whose id is
outside [0, E) add nothing (experts held elsewhere, e.g. on the GPU).

Roundings (both paths): x is rounded to int8 once per token and 32 values (dx = amax / 127 in fp32, codes =
x · (127 / amax) rounded to nearest even, clamped to ±127: glmtg/kernels/gguf/activation.py's
quantize_activation); gate and up rows meet those codes (integer dots per block, scaled in fp32); then
a = silu(g) · u in fp32 is rounded to int8 the same way; down meets those codes; the k slots are summed in
fp32 in slot order.

The compiled kernel (glmtg/cpu/moe_kernel.c, built by glmtg/cpu/build.py) runs where a C compiler is
found; otherwise the torch path below (same roundings, float matmuls on dequantized rows, slower).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from glmtg.cpu.build import kernel_library
from glmtg.formats import REGISTRY

# Formats the kernel reads, with its format codes (moe_kernel.c's enum).
# q5_1 and iq4_nl: the 32-wide fallbacks GLM-4.5-Air files use for widths not divisible by 256.
CPU_FORMATS: dict[str, int] = {"q8_0": 0, "q4_0": 1, "q5_0": 2, "q4_k": 3, "q6_k": 4, "q5_1": 5, "iq4_nl": 6}
GROUP = 32  # activation values per int8 scale


@functools.cache
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once): the kernel streams
    weights from RAM, and a second thread on a core adds no bandwidth, only contention. Read once per
    process (the default of every call: no sysfs reads per layer)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _fmt_code(fmt: object, what: str) -> int:
    if not isinstance(fmt, str) or fmt.lower() not in CPU_FORMATS:
        raise ValueError(f"{what}: format {fmt!r} is not supported by the CPU expert kernel "
                         f"(supported: {', '.join(CPU_FORMATS)})")
    return CPU_FORMATS[fmt.lower()]


def _check(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
           weights: torch.Tensor, gate_up_fmt: str, down_fmt: str) -> tuple[int, int, int, int, int]:
    """ValueError naming the argument for anything the kernel cannot read; (T, H, I, E, k)."""
    _fmt_code(gate_up_fmt, "gate_up_fmt")
    _fmt_code(down_fmt, "down_fmt")
    for name, t in (("x", x), ("gate", gate), ("up", up), ("down", down), ("ids", ids), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor, got {t.device} "
                             f"{'contiguous' if t.is_contiguous() else 'strided'}")
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be fp32 [T, H], got {x.dtype} {tuple(x.shape)}")
    t, h = x.shape
    if gate.dtype != torch.uint8 or gate.dim() != 3:
        raise ValueError(f"gate must be uint8 [E, I, row bytes of H], got {gate.dtype} {tuple(gate.shape)}")
    e, i, _ = gate.shape
    gu, dn = REGISTRY[gate_up_fmt.lower()], REGISTRY[down_fmt.lower()]
    if h % gu.block_size:
        raise ValueError(f"x: H={h} is not a multiple of {gu.block_size} ({gate_up_fmt}'s block)")
    if i % dn.block_size or i % GROUP:
        raise ValueError(f"gate: I={i} is not a multiple of {max(dn.block_size, GROUP)} ({down_fmt}'s block)")
    want = (e, i, gu.blocks_bytes(h))
    if tuple(gate.shape) != want:
        raise ValueError(f"gate must be uint8 {want} for {gate_up_fmt} rows of H={h}, got {tuple(gate.shape)}")
    if up.dtype != torch.uint8 or tuple(up.shape) != want:
        raise ValueError(f"up must be uint8 {want} like gate, got {up.dtype} {tuple(up.shape)}")
    want = (e, h, dn.blocks_bytes(i))
    if down.dtype != torch.uint8 or tuple(down.shape) != want:
        raise ValueError(f"down must be uint8 {want} for {down_fmt} rows of I={i}, got {down.dtype} "
                         f"{tuple(down.shape)}")
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != t:
        raise ValueError(f"ids must be int64 [T={t}, k], got {ids.dtype} {tuple(ids.shape)}")
    k = ids.shape[1]
    if weights.dtype != torch.float32 or tuple(weights.shape) != (t, k):
        raise ValueError(f"weights must be fp32 {(t, k)} like ids, got {weights.dtype} {tuple(weights.shape)}")
    return t, h, i, e, k


def cpu_moe(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor, gate_up_fmt: str, down_fmt: str, threads: int | None = None) -> torch.Tensor:
    """x fp32 [T, H]; gate/up uint8 [E, I, row bytes of H] and down uint8 [E, H, row bytes of I] (raw GGUF
    blocks, QuantExperts' layout); ids int64 [T, k] (ids outside [0, E) add nothing); weights fp32 [T, k]
    -> fp32 [T, H] (module docstring: roundings). ``threads``: OpenMP threads, default the physical cores.
    All tensors contiguous on the CPU; gate_up_fmt / down_fmt one of CPU_FORMATS."""
    t, h, i, e, k = _check(x, gate, up, down, ids, weights, gate_up_fmt, down_fmt)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    lib = kernel_library()
    if lib is None:
        return _torch_moe(x, gate, up, down, ids, weights, gate_up_fmt.lower(), down_fmt.lower())
    out = torch.empty((t, h), dtype=torch.float32)
    if t == 0:
        return out
    rc = lib.glmtg_cpu_moe(x.data_ptr(), t, h, i, e, k, gate.data_ptr(), up.data_ptr(), down.data_ptr(),
                           ids.data_ptr(), weights.data_ptr(), CPU_FORMATS[gate_up_fmt.lower()],
                           CPU_FORMATS[down_fmt.lower()], threads or physical_cores(), out.data_ptr())
    if rc == 2:
        raise MemoryError("glmtg.cpu: the CPU expert kernel could not allocate its scratch memory")
    if rc != 0:
        raise RuntimeError(f"glmtg.cpu: the CPU expert kernel failed (code {rc})")
    return out


def round_int8(v: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K] -> the values its int8 blocks stand for (codes · dx, fp32), the kernel's rounding."""
    g = v.reshape(*v.shape[:-1], -1, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    codes = torch.round(g * inv).clamp(-127, 127)  # torch.round: nearest even, as the kernel's nearbyintf
    return (codes * (amax / 127.0)).reshape(v.shape)


def _torch_moe(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, gate_up_fmt: str, down_fmt: str) -> torch.Tensor:
    """The slow path without a compiler: each expert with tokens dequantizes its rows (the registry's
    decoders) for float matmuls on the int8-rounded activations."""
    t, k = ids.shape
    e = gate.shape[0]
    out = torch.zeros((t, x.shape[1]), dtype=torch.float32)
    xr = round_int8(x)
    here = (ids >= 0) & (ids < e)
    deq_gu, deq_d = REGISTRY[gate_up_fmt].dequantize_blocks, REGISTRY[down_fmt].dequantize_blocks
    ys = torch.zeros((t, k, x.shape[1]), dtype=torch.float32)
    for ex in torch.unique(ids[here]).tolist():
        tok, slot = torch.nonzero(ids == ex, as_tuple=True)
        seg = xr[tok]
        a = F.silu(seg @ deq_gu(gate[ex]).T) * (seg @ deq_gu(up[ex]).T)
        ys[tok, slot] = round_int8(a) @ deq_d(down[ex]).T
    for s in range(k):  # slot order, as the kernel sums
        out += torch.where(here[:, s:s + 1], weights[:, s:s + 1] * ys[:, s], 0.0)
    return out
