"""The CPU expert kernel as a CUDA host node: a layer's host experts as stream work, so that a decode step
with host-placed experts is one CUDA graph and the host never waits on the device inside the step.

Per call, all on one CUDA stream (capturable, no host sync): x, stack slots and weights are copied to pinned
host buffers (``cudaMemcpyAsync``), ``cudaLaunchHostFunc`` queues moe_kernel.c's ``glmtg_cpu_moe_node`` (the
same ``glmtg_cpu_moe`` as the ctypes path, run by the driver's callback thread: no Python, no GIL), and the
pinned result is copied back to the device. The stream runs the host function after the copies to the host
and starts the copy back after it returns.

Pinned buffers: one set per (device, H, k, capacity) in a ``NodeStaging`` (the model's host arena holds one),
capacity the next power of two of T, shared by all layers of the model: their calls are ordered on the
stream, so layer l + 1's copy to the host starts after layer l's copy back. Sharing needs the model's
forwards to run on one stream at a time, as the engine and the serve runner do (a side stream forked and
joined within a layer, glmtg.cpu.split_experts, is ordered with it). Per (layer, T) one ``NodeArgs`` struct
with those buffers' and the layer's stacks' addresses, kept by the layer: a captured graph bakes the
struct's address and the buffers' addresses in, so neither is ever freed or moved while the layer lives.

The launcher: ``cudaLaunchHostFunc`` of the CUDA runtime this process already loaded (torch's), else the
driver's ``cuLaunchHostFunc`` (same arguments), else a runtime found beside torch (torch/lib, the
nvidia-cuda-runtime wheel) or by the loader. ``node_available()`` says whether this path runs here; where
it does not, host experts copy synchronously (glmtg.cpu.host_experts) and the decode step is not captured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from glmtg.cpu.build import kernel_library

ALIGN = 64  # bytes between the staging buffers: each starts on a cache line

# Field order is moe_kernel.c's glmtg_moe_node_args (checked against glmtg_cpu_moe_node_layout).
_FIELDS = ("x", "ids", "weights", "out", "gate", "up", "down", "T", "H", "I", "E", "k", "fgu", "fd", "nthreads",
           "rc")


class NodeArgs(ctypes.Structure):
    """moe_kernel.c's glmtg_moe_node_args: the host node's buffers, the layer's stacks and sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in _FIELDS[:7]] + [(name, ctypes.c_int32) for name in _FIELDS[7:]]


def layout_matches(lib: ctypes.CDLL) -> bool:
    """Whether NodeArgs has the C struct's size and field offsets (as the built kernel reports them)."""
    values = (ctypes.c_int64 * 32)()
    n = lib.glmtg_cpu_moe_node_layout(values, 32)
    want = [ctypes.sizeof(NodeArgs)] + [getattr(NodeArgs, f).offset for f in _FIELDS]
    return list(values[:n]) == want


def _launch_candidates() -> list[tuple[str, str]]:
    """(library, symbol) pairs to try, best first: a libcudart this process mapped already (torch's: launching
    through the runtime instance torch uses); the driver (always the installed driver's version); then a
    libcudart beside torch (torch/lib, the nvidia-cuda-runtime wheel) or the loader's, which could be built for
    a newer driver than the one installed, so they come last."""
    mapped: list[str] = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libcudart" in Path(path).name and path not in mapped:
                mapped.append(path)
    except (OSError, IndexError):
        pass
    found = [(p, "cudaLaunchHostFunc") for p in mapped] + [("libcuda.so.1", "cuLaunchHostFunc")]
    dirs = [Path(torch.__file__).parent / "lib"]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "cuda_runtime" / "lib" for p in spec.submodule_search_locations]
    for d in dirs:
        found += [(str(p), "cudaLaunchHostFunc") for p in sorted(d.glob("libcudart*.so*"))]
    name = ctypes.util.find_library("cudart")
    if name:
        found.append((name, "cudaLaunchHostFunc"))
    return found


@functools.cache
def host_launcher() -> Callable[[int, int, int], int] | None:
    """launch(stream handle, host function address, argument address) -> CUDA error code (0: queued), or
    None where no CUDA runtime or driver library can be loaded (_launch_candidates: the order). The runtime's
    cudaLaunchHostFunc and the driver's cuLaunchHostFunc take the same arguments (a cudaStream_t is a
    CUstream)."""
    for path, symbol in _launch_candidates():
        try:
            fn = getattr(ctypes.CDLL(path), symbol)
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
        return lambda stream, f, a: fn(stream, f, a)
    return None


@functools.cache
def _node_function() -> int | None:
    """The address of glmtg_cpu_moe_node in the built kernel, or None (no kernel, or a struct mismatch)."""
    lib = kernel_library()
    if lib is None:
        return None
    if not layout_matches(lib):
        warnings.warn("glmtg.cpu: the CPU kernel's host-node struct does not match glmtg.cpu.host_node.NodeArgs; "
                      "host experts run synchronously", RuntimeWarning, stacklevel=3)
        return None
    return ctypes.cast(lib.glmtg_cpu_moe_node, ctypes.c_void_p).value


@functools.cache
def node_available() -> bool:
    """Whether host experts with CUDA inputs run as host nodes here: CUDA, a launcher and the built kernel.
    Decided once per process (every host layer's forward asks)."""
    return torch.cuda.is_available() and host_launcher() is not None and _node_function() is not None


@functools.cache
def warn_unavailable() -> None:
    """One RuntimeWarning per process: CUDA inputs meet host experts without the host-node path."""
    warnings.warn("glmtg.cpu: no CUDA host-function launcher (libcudart / libcuda) or no compiled CPU kernel: "
                  "host experts copy synchronously and the decode step is not captured in a CUDA graph",
                  RuntimeWarning, stacklevel=3)


class NodeStaging:
    """Pinned host buffers for host nodes, one set per (device, H, k, capacity), never freed while this object
    lives (graphs bake their addresses in). A model's host arena holds one; its layers share the sets (module
    docstring: why that is safe). Each set is one block from torch's pinned allocator: copies to and from it
    are allowed inside a CUDA-graph capture, which torch refuses for memory page-locked behind its back
    (cudaHostRegister)."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, int, int, int], tuple[torch.Tensor, tuple[int, ...]]] = {}

    def views(self, device: torch.device, t: int, h: int, k: int) -> tuple[torch.Tensor, ...]:
        """(x fp32 [t, h], ids int64 [t, k], weights fp32 [t, k], out fp32 [t, h]) pinned host views."""
        cap = 1 << max(0, t - 1).bit_length()
        key = (str(device), h, k, cap)
        if key not in self._sets:
            offsets, n = [], 0
            for size in (cap * h * 4, cap * k * 8, cap * k * 4, cap * h * 4):
                offsets.append(n)
                n += -(-size // ALIGN) * ALIGN
            self._sets[key] = (torch.empty(n, dtype=torch.uint8, pin_memory=True), tuple(offsets))
        buf, offs = self._sets[key]
        shapes = (((t, h), torch.float32), ((t, k), torch.int64), ((t, k), torch.float32), ((t, h), torch.float32))
        return tuple(buf[off:off + r * c * dt.itemsize].view(dt).view(r, c) for off, ((r, c), dt) in zip(offs, shapes))



class HostNode:
    """One layer's host-node calls: ``gate``, ``up``, ``down`` its host stacks (uint8, contiguous, on the CPU),
    ``fgu`` / ``fd`` their kernel format codes, ``staging`` the model's pinned buffers. Keeps one NodeArgs per
    (device, T) alive as long as itself."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fgu: int, fd: int,
                 staging: NodeStaging, threads: int) -> None:
        self.stacks = (gate, up, down)
        self.fgu, self.fd, self.threads = fgu, fd, threads
        self.staging = staging
        self._calls: dict[tuple[str, int, int], tuple[NodeArgs, tuple[torch.Tensor, ...]]] = {}

    def _call(self, device: torch.device, t: int, k: int) -> tuple[NodeArgs, tuple[torch.Tensor, ...]]:
        key = (str(device), t, k)
        call = self._calls.get(key)
        if call is None:
            gate, up, down = self.stacks
            e, i, _ = gate.shape
            h = down.shape[1]
            bufs = self.staging.views(device, t, h, k)
            args = NodeArgs(*(b.data_ptr() for b in bufs), gate.data_ptr(), up.data_ptr(), down.data_ptr(),
                            t, h, i, e, k, self.fgu, self.fd, self.threads, 0)
            call = self._calls[key] = (args, bufs)
        return call

    def queue(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
              stream: torch.cuda.Stream) -> None:
        """Queue on ``stream``: x fp32 [T, H], slots int64 [T, k] (-1: held elsewhere), weights fp32 [T, k]
        (contiguous, on the device, ready on ``stream``) to pinned memory, the CPU kernel, its fp32 result
        into ``out`` [T, H] (on the device). The caller keeps the inputs and ``out`` alive until work queued
        after this on ``stream`` (or on a stream joined with it) is queued."""
        t, k = slots.shape
        args, (xh, ih, wh, oh) = self._call(x.device, t, k)
        with torch.cuda.stream(stream):
            xh.copy_(x, non_blocking=True)
            ih.copy_(slots, non_blocking=True)
            wh.copy_(weights, non_blocking=True)
            rc = host_launcher()(stream.cuda_stream, _node_function(), ctypes.addressof(args))
            if rc != 0:
                raise RuntimeError(f"glmtg.cpu: queueing the CPU experts as a CUDA host function failed "
                                   f"(CUDA error {rc})")
            out.copy_(oh, non_blocking=True)

    def last_status(self, device: torch.device, t: int, k: int) -> int:
        """The kernel's return code of the last finished call at (device, T, k) (0: ok, 1: format, 2: memory);
        meaningful after the stream has passed that call."""
        return int(self._call(device, t, k)[0].rc)


def node_inputs(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device-side preparation on the current stream: (x fp32, slots int64, weights fp32, all contiguous, and
    an empty fp32 [T, H] result buffer)."""
    return (x.detach().float().contiguous(), slots.to(torch.int64).contiguous(), weights.float().contiguous(),
            torch.empty(x.shape, dtype=torch.float32, device=x.device))
