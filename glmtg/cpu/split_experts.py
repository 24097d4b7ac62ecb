"""A MoE layer whose routed experts are split between the model's device and host memory (``--gpu-experts``).

``SplitExperts`` takes a layer's place of ``QuantExperts``: the experts of ``device_ids`` are a
``QuantExperts`` on the model's device (an ``ExpertPlacement`` of those ids: the GPU kernels read them through
a global id -> stack slot table), the others a ``HostExperts`` in the model's host arena. Each (token, expert)
pair is computed by exactly one part (the other sees its id as -1 and its weight as 0), and the two partial
sums add in fp32: the result is the all-in-one-place one up to fp32 summation order (plus, for bf16/f16
activations, the device part's rounding to that dtype before the add).

On CUDA the host part is a host node (glmtg.cpu.host_node) queued on a side stream forked from the current
one: its copies to pinned memory, the CPU kernel and the copy back run while the current stream computes the
device part's experts; the current stream then waits for the side stream (events: capturable, no host
sync) and adds the two sums. A big batch runs the host part on the GPU as well, from a streamed copy of its
blocks (glmtg.cpu.stream_experts). Where the host-node path is unavailable, the old path: the copies to
pinned memory are queued, the device experts behind them, and the host waits on the copies' event before it
calls the CPU kernel (such a model decodes without CUDA graphs: glmtg.engine.decode_graph_blocker).

Checkpoint view: one slot per stacked parameter, as an unsplit layer's (``slots``), so loaders and writers
see the file's whole stacks; ``load_expert`` and ``load_split`` send each expert to its part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.cpu.host_experts import HostArena, HostExperts
from glmtg.cpu.host_node import node_available, warn_unavailable
from glmtg.cpu.stream_experts import stream_prefill, use_stream
from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.params import TensorSlot
from glmtg.layers.quant_experts import PARAMS, QuantExperts


class SplitExperts(nn.Module):
    """Layer ``layer``'s routed experts: ``device_ids`` on the device this module is built on (under a
    ``torch.device`` context, or meta), the rest in host memory (``arena``). ValueError when ``device_ids``
    is empty or holds every expert (then the layer is not split: use QuantExperts or HostExperts), or for
    formats the CPU kernel does not read (HostExperts' check)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, formats: Mapping[str, str], arena: HostArena,
                 layer: int, device_ids: Iterable[int], backend: str = "auto") -> None:
        super().__init__()
        n = config.n_routed_experts
        on_device = ExpertPlacement.of_ids(n, device_ids)
        if on_device.holds_all:
            raise ValueError(f"device_ids: all {n} experts of layer {layer} on the device is no split layer")
        self.layer = layer
        self.placement = ExpertPlacement.whole(n)  # what the layer as a whole holds: every expert
        self.device_experts = QuantExperts(config, dtype, formats, placement=on_device, backend=backend)
        host = ExpertPlacement.of_ids(n, (e for e in range(n) if not on_device.holds(e)))
        self.host_experts = HostExperts(config, dtype, formats, arena, layer, placement=host)
        self.formats = dict(self.device_experts.formats)
        self.widths = dict(self.device_experts.widths)
        self._side: dict[str, torch.cuda.Stream] = {}  # per device: the stream the host part is queued on

    def slots(self, prefix: str) -> Iterator[TensorSlot]:
        """The checkpoint slots of the whole layer (``prefix`` = this module's name + "."): the file's stacks
        [E, rows, width] in their formats, as an unsplit QuantExperts lists them."""
        for param in PARAMS:
            rows = getattr(self.device_experts, param).shape[1]
            yield TensorSlot(prefix + param, None, (self.placement.num_experts, rows, self.widths[param]),
                             torch.uint8, self.formats[param])

    def stack(self, param: str) -> torch.Tensor:
        """The whole raw stack of ``param`` (uint8 [E, rows, row bytes]) in layer order, on the host: a copy
        gathered from both parts (for writing the model out)."""
        dev, host = self.device_experts, self.host_experts
        first = getattr(host, param)
        out = torch.empty((self.placement.num_experts, *first.shape[1:]), dtype=torch.uint8)
        out[list(dev.placement.held)] = getattr(dev, param).detach().cpu()
        out[list(host.placement.held)] = first.detach()
        return out

    def load_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Write raw blocks of expert ``expert`` (a layer-wide index) of ``param``, or the whole stack [E, ...]
        for None, into the part that holds it: the device part on ``value``'s device, the host part copied
        into the arena. True: every expert is held by one of the parts."""
        if expert is not None:
            return (self.device_experts.load_expert(param, expert, value)
                    or self.host_experts.load_expert(param, expert, value))
        self.load_split(param, value, value.device)
        return True

    def load_split(self, param: str, value: torch.Tensor, device: torch.device | str) -> None:
        """Write the whole stack ``value`` (uint8 [E, rows, row bytes], on any device: a file's memory map)
        of ``param``: the device experts' rows copied to ``device``, the host experts' into the arena. Only
        the held rows are copied anywhere (never the whole stack to the device)."""
        if param not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
        n = self.placement.num_experts
        if value.dim() != 3 or value.shape[0] != n:
            raise ValueError(f"{param}: expected the whole stack of {n} experts, got shape {tuple(value.shape)}")
        dev, host = self.device_experts.placement, self.host_experts.placement
        rows = value[torch.tensor(dev.held, device=value.device)].to(device=device, copy=True)
        self.device_experts.load_expert(param, None, rows)
        self.host_experts.load_expert(param, None, value[torch.tensor(host.held, device=value.device)])

    def reads_int8(self) -> bool:
        """Whether the device part's decode kernel reads int8 activations (the host part rounds its own)."""
        return self.device_experts.reads_int8()

    def shared_blocks(self, x: torch.Tensor, shared: nn.Module | None) -> None:
        """Never: a split layer's shared expert runs as its own module on the device."""
        return None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] (layer-wide expert ids) -> Σ_k weights * expert_k(x), [T, H] in x's
        dtype on x's device: the device experts' sum plus the host experts' sum, added in fp32. A big batch
        on CUDA runs the host part on the GPU too, from a streamed copy (glmtg.cpu.stream_experts)."""
        host = self.host_experts
        if use_stream(host, x):
            on_device = self.device_experts(x, ids, weights)  # queued first: runs while the copy may still go
            streamed = stream_prefill(host, x, ids, weights)
            return (on_device.float() + streamed.float()).to(x.dtype)
        if x.is_cuda and node_available():
            inputs = host.node_inputs(x, ids, weights)  # made on the current stream, used by both
            main = torch.cuda.current_stream(x.device)
            side = self._side.get(str(x.device))
            if side is None:
                side = self._side[str(x.device)] = torch.cuda.Stream(x.device)
            side.wait_stream(main)
            host.queue_node(inputs, side)  # the CPU kernel runs while the device experts below run on main
            on_device = self.device_experts(x, ids, weights)
            main.wait_stream(side)  # ``inputs`` stay referenced until here: their memory is not reused early
            return (on_device.float() + inputs[3]).to(x.dtype)
        if x.is_cuda:
            warn_unavailable()
        staged = host.to_host(x, ids, weights, non_blocking=True)
        copied = None
        if x.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        on_device = self.device_experts(x, ids, weights)  # queued behind the copies; runs beside the CPU
        if copied is not None:
            copied.synchronize()  # the copies only, not the device experts queued after them
        on_host = host.host_sum(*staged)
        return (on_device.float() + on_host.to(x.device)).to(x.dtype)
