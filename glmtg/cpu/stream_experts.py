"""Prefill chunks of host-placed experts run on the GPU from a streamed copy of their blocks (``--host-prefill``).

For a batch of at least ``min_tokens`` tokens (default ``MIN_TOKENS``) on CUDA, a HostExperts layer does not
run the CPU expert kernel: its gate/up/down stacks (the file's GGUF blocks, unchanged) are copied from the
pinned host arena into a device staging buffer on a dedicated copy stream, and the grouped GEMM that
QuantExperts runs for many pairs (``glmtg.kernels.gguf.mmq_moe.moe_prefill``) reads that copy. This is what
llama.cpp / ik_llama.cpp do for big batches with ``-ot exps=CPU``: a 4096-token chunk makes every expert of a
layer busy, so moving the layer's ~1.25 GB (Air, Q4_0) over PCIe (~25-30 ms) beats computing on the CPU
(seconds), while a decode step (a few tokens) reads each expert's rows once on the CPU, cheaper than a copy.

``MIN_TOKENS`` (64, where a layer's copy and the CPU kernel's time cross: bench/DECISIONS.md L2) is the
default threshold; ``--host-prefill-min N`` overrides it.

Double buffering: two staging buffers per host arena (per model), each the size of the largest host layer,
allocated once at first use on the input's device (memory: 2 x the largest host layer's expert bytes, e.g.
2.5 GB for Air at Q4_0). A layer's call copies itself (unless already prefetched) into one buffer and starts
the copy of the next host layer of the model (wrapping from the last to the first: the next chunk's first
layer) into the other, so the copy of layer i+1 overlaps layer i's kernels and the attention between them.
Ordering, with events: a kernel waits for its buffer's copy; a copy into a buffer waits until the kernels
that read that buffer before have run. A prefetched copy serves exactly one call of its layer: any other
call (the same layer again, a decode step run on the CPU meanwhile, a layer out of order) copies afresh or
leaves the buffer untouched, so a wrong guess costs a copy, never a stale result. Weights written into the
arena after inference began are not seen by a copy already made: load weights before running.

Where the staging buffers do not fit in the device's free memory, the layer runs on the CPU as before, with
one RuntimeWarning. Not inside CUDA-graph capture (decode steps are captured; they stay on the CPU path).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from glmtg.layers.quant_experts import PARAMS
from glmtg.layers.quant_linear import has_device_decoder

if TYPE_CHECKING:
    from glmtg.cpu.host_experts import HostArena, HostExperts

MODES = ("gpu", "cpu")
MIN_TOKENS = 64
STAGE_ALIGN = 256  # bytes: each stack's view in a staging buffer starts here (the kernels need 16)
HEADROOM = 512 * 2**20  # device bytes kept free beside the staging buffers: the prefill kernels' transients


def parse_host_prefill(text: object) -> str:
    """``--host-prefill``'s value -> "gpu" or "cpu". ValueError naming the flag otherwise."""
    if isinstance(text, str) and text in MODES:
        return text
    raise ValueError(f"--host-prefill wants gpu or cpu, got {text!r}")


def parse_min_tokens(text: object) -> int:
    """``--host-prefill-min``'s value -> a token count >= 1. ValueError naming the flag otherwise."""
    try:
        n = int(text) if isinstance(text, (str, int)) and not isinstance(text, bool) else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"--host-prefill-min wants a token count >= 1, got {text!r}")
    return n


def stack_layout(experts: HostExperts) -> tuple[dict[str, int], int]:
    """Where each of ``experts``' stacks sits in a staging buffer (param -> byte offset) and the bytes the
    three take together (each start aligned to STAGE_ALIGN)."""
    offsets, end = {}, 0
    for p in PARAMS:
        offsets[p] = end
        end += -(-getattr(experts, p).numel() // STAGE_ALIGN) * STAGE_ALIGN
    return offsets, end


def streamable(experts: HostExperts) -> bool:
    """Whether the GPU's grouped GEMM reads this layer's formats (gate and up share one: HostExperts checks)."""
    return all(has_device_decoder(f) for f in experts.formats.values())


class Stager:
    """A host arena's two device staging buffers, the copy stream and the events that order copies and
    kernels (module docstring). ``members``: the arena's streamable layers in model order (prefetch order)."""

    def __init__(self, members: list[HostExperts], device: torch.device) -> None:
        self.members = members
        self.index = {id(m): i for i, m in enumerate(members)}
        self.device = device
        self.nbytes = max(stack_layout(m)[1] for m in members)
        with torch.inference_mode(False):  # writable later outside inference mode too (made in the first call)
            self.buffers = [torch.empty(self.nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:  # freed only after the copy stream's queued work too (a stager dropped mid-flight)
            for buf in self.buffers:
                buf.record_stream(self.stream)
        self.ready: list[torch.cuda.Event | None] = [None, None]  # copy into buffer b done (copy stream)
        self.freed: list[torch.cuda.Event | None] = [None, None]  # last kernels reading b done (compute)
        self.holds: list[HostExperts | None] = [None, None]  # an unconsumed copy of this layer sits in b
        self.last = 1  # the buffer the latest call read
        self.copies = 0  # layer copies issued (prefetches included): for the bench's record

    def stage(self, experts: HostExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``experts``' gate, up, down stacks on the device, ready for kernels queued next on the current
        stream; starts the prefetch of the next member. The caller calls ``done`` after queueing its kernels."""
        b = next((j for j in (0, 1) if self.holds[j] is experts), None)
        if b is None:
            b = next((j for j in (0, 1) if self.holds[j] is None), 1 - self.last)
            self._copy(experts, b)
        self.holds[b] = None  # this copy is consumed by this call
        self.last = b
        i = self.index.get(id(experts))
        if i is not None:
            after = self.members[(i + 1) % len(self.members)]
            if self.holds[1 - b] is not after:
                self._copy(after, 1 - b)
                self.holds[1 - b] = after
        if self.cuda and self.ready[b] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[b])
        return self._views(experts, b)

    def done(self) -> None:
        """The kernels reading the latest call's buffer are queued: later copies into it wait for them."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.freed[self.last] = event

    def _views(self, experts: HostExperts, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets, _ = stack_layout(experts)
        buf = self.buffers[b]
        out = []
        for p in PARAMS:
            src = getattr(experts, p)
            out.append(buf[offsets[p]:offsets[p] + src.numel()].view(src.shape))
        return tuple(out)

    def _copy(self, experts: HostExperts, b: int) -> None:
        """Queue the copy of ``experts``' stacks into buffer ``b`` (after the kernels that read b before)."""
        self.copies += 1
        dst = self._views(experts, b)
        if not self.cuda:  # the CPU as the device (tests): a plain copy, nothing to order
            for d, p in zip(dst, PARAMS):
                d.copy_(getattr(experts, p))
            return
        with torch.cuda.stream(self.stream):
            if self.freed[b] is not None:
                self.stream.wait_event(self.freed[b])
            for d, p in zip(dst, PARAMS):
                d.copy_(getattr(experts, p), non_blocking=True)  # pinned arena: an async DMA
            event = torch.cuda.Event()
            event.record(self.stream)
            self.ready[b] = event


@dataclass
class _State:
    """A host arena's streaming settings and, once used, its stager (None until then; False when the
    staging buffers did not fit: the CPU path from then on)."""

    mode: str = "gpu"
    min_tokens: int = MIN_TOKENS
    stager: Stager | None | bool = None


_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HostArena -> _State


def _state(arena: HostArena) -> _State:
    state = _states.get(arena)
    if state is None:
        state = _states[arena] = _State()
    return state


def configure(model: torch.nn.Module, mode: str = "gpu", min_tokens: int = MIN_TOKENS) -> None:
    """Set ``model``'s host prefill: ``mode`` "gpu" (stream big batches, the default) or "cpu" (always the
    CPU kernel), streaming from ``min_tokens`` tokens on. ValueError for bad values. Switching to "cpu"
    frees the staging buffers (after the device finished with them)."""
    from glmtg.cpu.host_experts import HostExperts

    mode = parse_host_prefill(mode)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be an int >= 1, got {min_tokens!r}")
    for arena in {id(m.arena): m.arena for m in model.modules() if isinstance(m, HostExperts)}.values():
        state = _state(arena)
        if mode == "cpu" and isinstance(state.stager, Stager):
            if state.stager.cuda:
                torch.cuda.synchronize(state.stager.device)  # no kernel or copy still uses the buffers
            state.stager = None
        state.mode, state.min_tokens = mode, min_tokens


def settings(model: torch.nn.Module) -> dict[str, object] | None:
    """``model``'s host prefill (mode, min_tokens, staging bytes allocated, layer copies so far), or None
    without host-placed experts: for benchmark records."""
    from glmtg.cpu.host_experts import HostExperts

    arena = next((m.arena for m in model.modules() if isinstance(m, HostExperts)), None)
    if arena is None:
        return None
    state = _state(arena)
    stager = state.stager if isinstance(state.stager, Stager) else None
    return {"mode": state.mode, "min_tokens": state.min_tokens,
            "staging_bytes": 2 * stager.nbytes if stager else 0, "copies": stager.copies if stager else 0}


def use_stream(experts: HostExperts, x: torch.Tensor) -> bool:
    """Whether ``experts``' forward for input ``x`` streams: mode "gpu", x on CUDA with at least
    ``min_tokens`` rows, not capturing a CUDA graph, formats the GPU kernels read, and staging memory."""
    state = _state(experts.arena)
    if (state.mode != "gpu" or not x.is_cuda or x.shape[0] < state.min_tokens or state.stager is False
            or torch.cuda.is_current_stream_capturing() or not streamable(experts)):
        return False
    return _stager(experts, x.device) is not None


def _stager(experts: HostExperts, device: torch.device) -> Stager | None:
    """The arena's stager on ``device``, made at first use; None (and one warning) where its buffers do not
    fit in the device's free memory."""
    state = _state(experts.arena)
    if isinstance(state.stager, Stager) and state.stager.device == device:
        return state.stager
    if state.stager is False:
        return None
    # the arena's layers in the order the model built them (layer order): the prefetch order
    members = [m for m in experts.arena.members if streamable(m)]
    if experts not in members:
        members.append(experts)
    need = 2 * max(stack_layout(m)[1] for m in members)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache
        fits = need + HEADROOM <= free
        if fits:
            try:
                state.stager = Stager(members, device)
            except torch.cuda.OutOfMemoryError:
                fits = False
        if not fits:
            state.stager = False
            warnings.warn(f"host-placed experts: the {need / 1e9:.2f} GB of device staging buffers for GPU "
                          f"prefill do not fit in the free device memory ({free / 1e9:.2f} GB); prefill runs "
                          f"them on the CPU (slower; free memory, or --host-prefill cpu to silence this)",
                          RuntimeWarning, stacklevel=3)
            return None
        return state.stager
    state.stager = Stager(members, device)
    return state.stager


def stream_prefill(experts: HostExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                   ) -> torch.Tensor:
    """x [T, H], ids/weights [T, k] (layer-wide expert ids) -> Σ_k weights · expert_k(x) over the experts
    ``experts`` holds, [T, H] in x's dtype on x's device: moe_prefill on a device copy of the stacks (slots
    routed to experts held elsewhere add nothing). Roundings: moe_prefill's (float activations, as the
    device's QuantExperts), not the CPU kernel's int8. Any device works (the CPU too: tests); the caller
    decides when it pays (``use_stream``)."""
    from glmtg.kernels.gguf import mmq_moe

    stager = _stager(experts, x.device)
    if stager is None:
        raise RuntimeError("stream_prefill: no staging memory on the device (ask use_stream first)")
    if not experts.placement.holds_all:
        ids = experts.placement.local_ids(ids)  # -1 for experts held elsewhere; the kernel skips them
        weights = torch.where(ids >= 0, weights, 0.0)
    gate, up, down = stager.stage(experts)
    try:
        return mmq_moe.moe_prefill(x, gate, up, down, ids, weights.float(), experts.formats["gate_proj"],
                                   experts.formats["down_proj"])
    finally:
        stager.done()
