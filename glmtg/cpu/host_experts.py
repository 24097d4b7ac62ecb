"""Routed experts of a layer held in host memory, in GGUF blocks, run by the CPU expert kernel.

``HostExperts`` is a ``QuantExperts`` whose three stacks are views into one ``HostArena`` (all host-placed
stacks of a model in one 64-byte-aligned block, pinned when CUDA is available so that a later slice can
stream from it asynchronously) and whose forward runs ``cpu_moe``: x, ids and weights go to the host, the
fused CPU call computes Σ_k w_k expert_k(x), and the result comes back in x's dtype on x's device, to be
added where the device experts' result would be (glmtg.layers.moe.MoE: the shared expert adds to it).

CUDA inputs: the copies and the CPU call are queued on the current stream as a CUDA host node
(glmtg.cpu.host_node): no host sync, capturable, so a decode step with host experts is one CUDA graph.
Where that path is unavailable (no CUDA runtime library or no compiled kernel; one warning) and for CPU
inputs, the copies are synchronous and the kernel is called from Python.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.cpu.experts import CPU_FORMATS, cpu_moe, physical_cores
from glmtg.cpu.host_node import HostNode, NodeStaging, node_available, node_inputs, warn_unavailable
from glmtg.cpu.stream_experts import stream_prefill, use_stream
from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.quant_experts import PARAMS, QuantExperts

ALIGN = 64  # bytes: every stack starts on a cache line (and an AVX-512 load)


class HostArena:
    """One block of host memory shared by a model's host-placed expert stacks.

    Stacks are reserved first (``reserve``: sizes only, while the model is built, possibly on meta) and the
    block is allocated once, at the first ``allocate`` (when the weights are written), so it is one
    allocation of the exact total, each stack at a 64-byte-aligned offset. ``pin``: register the block
    with CUDA (cudaHostRegister: page-locked in place, at its exact size, where torch's pinned allocator
    would round a 60 GB request up to a power of two).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = bool(pin)
        self.nbytes = 0
        self.buffer: torch.Tensor | None = None  # uint8 [nbytes], base 64-byte aligned
        self.pinned = False
        self._raw: torch.Tensor | None = None
        self._members: list[HostExperts] = []
        self.staging = NodeStaging()  # pinned buffers of its members' host-node calls, allocated on use

    def reserve(self, nbytes: int) -> int:
        """Room for ``nbytes`` more bytes; returns their offset (a multiple of ALIGN)."""
        if self.buffer is not None:
            raise RuntimeError("HostArena: reserve after the arena was allocated")
        offset = -(-self.nbytes // ALIGN) * ALIGN
        self.nbytes = offset + int(nbytes)
        return offset

    def join(self, member: HostExperts) -> None:
        self._members.append(member)

    @property
    def members(self) -> list[HostExperts]:
        """The layers whose stacks live here, in the order they joined (the model's layer order)."""
        return list(self._members)

    def allocate(self) -> None:
        """Allocate the block (once) and point every member's stacks at their views."""
        if self.buffer is not None:
            return
        raw = torch.empty(self.nbytes + ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % ALIGN
        self.buffer = raw[skip:skip + self.nbytes]
        self._raw = raw
        if self.pin and self.nbytes:
            self.pinned = _register(self, raw)
        for member in self._members:
            member.bind(self)

    def view(self, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self.buffer[offset:offset + n].view(shape)


def _register(owner: HostArena, raw: torch.Tensor) -> bool:
    """Page-lock ``raw`` for CUDA, unregistered when ``owner`` (which holds ``raw``) is collected, before its
    memory is freed; False, with a warning, on failure."""
    cudart = torch.cuda.cudart()
    rc = int(cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0))
    if rc != 0:
        warnings.warn(f"could not pin the {raw.numel() / 1e9:.2f} GB of host-placed experts (cudaHostRegister "
                      f"error {rc}); they stay in pageable memory", RuntimeWarning, stacklevel=3)
        return False
    weakref.finalize(owner, _unregister, raw.data_ptr())
    return True


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be gone
        pass


class HostExperts(QuantExperts):
    """A layer's routed experts in host memory: gate/up uint8 [E', I, row bytes of H], down uint8 [E', H,
    row bytes of I] (the file's blocks, unchanged), views into ``arena``. ``layer`` names the layer in
    messages. ValueError when the formats are not ones the CPU expert kernel reads."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, formats: Mapping[str, str], arena: HostArena,
                 layer: int, placement: ExpertPlacement | None = None) -> None:
        with torch.device("meta"):  # shapes only: the storage is the arena's
            super().__init__(config, dtype, formats, placement=placement, backend="torch")
        where = f"layer {layer}'s routed experts"
        bad = sorted({f for f in self.formats.values() if f not in CPU_FORMATS})
        if bad:
            raise ValueError(f"{where} are {', '.join(bad)}, which the CPU expert kernel does not read "
                             f"(it reads {', '.join(CPU_FORMATS)}): keep this layer's experts on the GPU")
        if self.formats["gate_proj"] != self.formats["up_proj"]:
            raise ValueError(f"{where}: gate ({self.formats['gate_proj']}) and up ({self.formats['up_proj']}) "
                             f"must share a format for the CPU expert kernel")
        self.layer = layer
        self.arena = arena
        self._node: HostNode | None = None  # made at the first CUDA call, after the arena is bound
        self._offsets = {p: arena.reserve(getattr(self, p).numel()) for p in PARAMS}
        arena.join(self)

    def bind(self, arena: HostArena) -> None:
        """Point the stacks at their views of the allocated arena (HostArena.allocate calls this)."""
        for p in PARAMS:
            shape = tuple(getattr(self, p).shape)
            self._parameters[p] = nn.Parameter(arena.view(self._offsets[p], shape), requires_grad=False)
        self._node = None

    def load_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Copy raw blocks (from any device: a memory map, the GPU) into the arena: the whole stack for
        ``expert`` None, else one layer-wide expert (False, storing nothing, for one held elsewhere)."""
        if param not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
        self.arena.allocate()
        stack = getattr(self, param)
        if expert is not None:
            p = self.placement
            if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < p.num_experts:
                raise ValueError(f"expert must be an int in [0, {p.num_experts}), got {expert!r}")
            if not p.holds(expert):
                return False
            stack = stack[p.slot(expert)]
        if tuple(value.shape) != tuple(stack.shape) or value.dtype != stack.dtype:
            raise ValueError(f"{param}: expected {stack.dtype} {tuple(stack.shape)}, got {value.dtype} "
                             f"{tuple(value.shape)}")
        with torch.no_grad():
            stack.copy_(value)
        return True

    def reads_int8(self) -> bool:
        """False: the CPU kernel rounds the activations itself (the norm before it need not)."""
        return False

    def shared_blocks(self, x: torch.Tensor, shared: nn.Module | None) -> None:
        """Never: the shared expert stays on the device (the CPU kernel runs the routed experts only)."""
        return None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] (layer-wide expert ids) -> Σ_k weights * expert_k(x), [T, H] in x's
        dtype on x's device; slots routed to experts held elsewhere add nothing. A big batch on CUDA runs on
        the GPU from a streamed copy of the blocks (glmtg.cpu.stream_experts); other CUDA inputs are queued on
        the current stream as a host node (no host sync; the result is ready in stream order)."""
        if use_stream(self, x):
            return stream_prefill(self, x, ids, weights)
        if x.is_cuda:
            if node_available():
                inputs = self.node_inputs(x, ids, weights)
                self.queue_node(inputs, torch.cuda.current_stream(x.device))
                return inputs[3].to(x.dtype)
            warn_unavailable()
        return self.host_sum(*self.to_host(x, ids, weights)).to(device=x.device, dtype=x.dtype)

    def node_inputs(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``queue_node``, made on the current stream: (x fp32, stack slots int64 (-1: held elsewhere),
        weights fp32, all contiguous on x's device, and the empty fp32 [T, H] device buffer of the result)."""
        slots = ids if self.placement.holds_all else self.placement.local_ids(ids)
        return node_inputs(x, slots, weights)

    def queue_node(self, inputs: tuple[torch.Tensor, ...], stream: torch.cuda.Stream) -> None:
        """Queue ``node_inputs``' copies to pinned memory, the CPU kernel and the copy of its result into
        ``inputs[3]`` on ``stream`` (glmtg.cpu.host_node.HostNode.queue: the caller keeps ``inputs`` alive)."""
        if self._node is None:
            fgu, fd = CPU_FORMATS[self.formats["gate_proj"]], CPU_FORMATS[self.formats["down_proj"]]
            self._node = HostNode(self.gate_proj, self.up_proj, self.down_proj, fgu, fd, self.arena.staging,
                                  physical_cores())
        self._node.queue(*inputs, stream)

    def to_host(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, non_blocking: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, ids, weights as ``host_sum`` takes them: fp32 [T, H], int64 stack slots (-1: held elsewhere),
        fp32 [T, k], contiguous on the host. ``non_blocking`` (CUDA inputs): the copies go to pinned buffers
        and are only queued on the current stream; the caller synchronizes (an event recorded after this call)
        before ``host_sum`` reads them, and meanwhile may queue more device work (glmtg.cpu.split_experts)."""
        if not self.placement.holds_all:
            ids = self.placement.local_ids(ids)
        parts = (x.detach().float(), ids.to(torch.int64), weights.float())
        if not (non_blocking and x.is_cuda):
            return tuple(p.to("cpu").contiguous() for p in parts)
        staged = tuple(torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts)
        for dst, src in zip(staged, parts):
            dst.copy_(src, non_blocking=True)
        return staged

    def host_sum(self, xh: torch.Tensor, ih: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
        """``to_host``'s tensors -> Σ_k w_k expert_k(x) of the experts held here, fp32 [T, H] on the host."""
        return cpu_moe(xh, self.gate_proj, self.up_proj, self.down_proj, ih, wh, self.formats["gate_proj"],
                       self.formats["down_proj"])


def host_expert_layers(model: nn.Module) -> list[int]:
    """The layers of ``model`` whose routed experts are host-resident (HostExperts), in order."""
    return sorted(m.layer for m in model.modules() if isinstance(m, HostExperts))

