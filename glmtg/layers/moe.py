"""Mixture of experts: sigmoid router, routed experts (stacked, placed on devices) and the MoE block.

How the routed experts run is chosen from shapes, dtype and device, never from routing data, so a decode
step at any batch size reads nothing back to the host and can be captured in a CUDA graph:

- few (token, expert) pairs (T·k <= experts held, i.e. decode of small batches): the Triton kernel
  (glmtg/kernels/moe_decode.py) reads the chosen experts' weights in place; the torch backend copies
  them out first (``gathered_experts``).
- many pairs: pairs sorted by expert on the device, one grouped matmul per projection
  (``torch._grouped_mm`` with offsets computed on the device) where it runs without reading them on the
  host (``grouped_mm_applies``); elsewhere, up to ``DENSE_MAX_TOKENS`` tokens (every decode step), every
  held expert runs on every token and each pair picks its expert's output (``dense_experts``: experts/k
  times the arithmetic, no sync), and longer inputs (prefill) loop over the experts that have pairs
  (``looped_experts``, one host read of the counts).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.config import ModelConfig
from glmtg.kernels.gguf.mmq_moe import sort_by_expert
from glmtg.kernels.moe_decode import moe_decode
from glmtg.layers import fused
from glmtg.layers.mlp import MLP
from glmtg.layers.params import write_parameter

EXPERT_BACKENDS = ("auto", "kernel", "torch")
# Tokens up to which many pairs without a sync-free grouped matmul run dense_experts. A decode step has at
# most batch x 16 tokens; at those sizes dense_experts reads each expert once, as any path must when the
# batch picks most experts, and its extra arithmetic hides under that read. Longer inputs (prefill, never
# captured) take looped_experts, whose host read of the counts costs one sync per layer, not E/k the work.
DENSE_MAX_TOKENS = 512
# Tokens up to which the router runs as glmtg's kernels (a decode step; its logits kernel holds every token's
# partial sums in registers). Prefill scores with torch.
ROUTE_KERNEL_MAX_TOKENS = 16
# Elements of the largest per-chunk intermediate of dense_experts ([E, tokens, max(H, I)]): bounds its memory.
_DENSE_CHUNK_ELEMENTS = 1 << 25


class Router(nn.Module):
    """Sigmoid scores; experts chosen by score + bias, weighted by the unbiased score (DeepSeek-V3 style)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Kept in fp32 whatever the model dtype (as transformers does): near-ties between experts decide the
        # choice, and bf16 logits would flip it.
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids int64 [T, k], fp32 weights [T, k])."""
        if self.n_group == 1 and fused.fuses(x) and x.shape[0] <= ROUTE_KERNEL_MAX_TOKENS:
            from glmtg.kernels.router import route

            return route(x, self.weight, self.e_score_correction_bias, top_k=self.top_k,
                         norm_topk_prob=self.norm_topk_prob, scaling=self.scaling)
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            t, e = choice.shape
            grouped = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]: sum of each group's best two
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(t, e), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts one ``Experts`` module holds, of a layer's ``num_experts``: the range [start, stop),
    or, with ``ids``, exactly those experts (sorted, unique; start/stop are then their min and max + 1).

    Experts not held live on another device (or in host memory); their slots contribute zero here, so the
    outputs of the modules holding all the experts of a layer (one per device) sum to the layer's output.
    Held expert ``ids[j]`` (or ``start + j``) is stored in slot j of the module's stacks (``slot``).
    Contiguous ranges split experts over tensor-parallel ranks; sets of ids put a layer's most selected
    experts on the GPU and the rest in host memory (glmtg/cpu/gpu_experts.py).
    """

    num_experts: int
    start: int
    stop: int
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not (isinstance(self.start, int) and isinstance(self.stop, int)
                and 0 <= self.start < self.stop <= self.num_experts):
            raise ValueError(f"start/stop must satisfy 0 <= start < stop <= {self.num_experts}, "
                             f"got {self.start!r}, {self.stop!r}")
        if self.ids is None:
            return
        ids = self.ids
        if not (isinstance(ids, tuple) and ids and all(isinstance(e, int) and not isinstance(e, bool) for e in ids)
                and list(ids) == sorted(set(ids)) and (ids[0], ids[-1] + 1) == (self.start, self.stop)):
            raise ValueError(f"ids must be a sorted tuple of distinct ints from start to stop - 1, got {ids!r}")
        if len(ids) == self.stop - self.start:  # a contiguous range: one spelling for it
            object.__setattr__(self, "ids", None)

    @classmethod
    def whole(cls, num_experts: int) -> ExpertPlacement:
        return cls(num_experts, 0, num_experts)

    @classmethod
    def of_ids(cls, num_experts: int, ids: Iterable[int]) -> ExpertPlacement:
        """The placement holding exactly experts ``ids`` (any order; ValueError for none, a repeat or one
        outside [0, num_experts))."""
        got = list(ids)
        held = tuple(sorted(set(got)))
        if not held or len(held) != len(got) or not all(isinstance(e, int) and not isinstance(e, bool)
                                                         for e in held):
            raise ValueError(f"ids must be distinct ints, at least one, got {got!r}")
        if held[0] < 0 or held[-1] >= num_experts:
            raise ValueError(f"ids must lie in [0, {num_experts}), got {held[0] if held[0] < 0 else held[-1]}")
        return cls(num_experts, held[0], held[-1] + 1, held)

    @classmethod
    def split(cls, num_experts: int, parts: int) -> list[ExpertPlacement]:
        """``parts`` contiguous ranges of (nearly) equal size, one per device."""
        if not isinstance(parts, int) or not 1 <= parts <= num_experts:
            raise ValueError(f"parts must be an int in [1, {num_experts}], got {parts!r}")
        bounds = [num_experts * i // parts for i in range(parts + 1)]
        return [cls(num_experts, a, b) for a, b in zip(bounds, bounds[1:])]

    @classmethod
    def of_layer(cls, placement: ExpertPlacement | None, config: ModelConfig) -> ExpertPlacement:
        """``placement`` checked against the config's routed experts (ValueError), or all of them for None."""
        if placement is None:
            return cls.whole(config.n_routed_experts)
        if placement.num_experts != config.n_routed_experts:
            raise ValueError(f"placement covers {placement.num_experts} experts, the config has "
                             f"{config.n_routed_experts}")
        return placement

    @property
    def held(self) -> tuple[int, ...]:
        """The layer-wide ids of the held experts, in slot order."""
        return self.ids if self.ids is not None else tuple(range(self.start, self.stop))

    @property
    def count(self) -> int:
        return len(self.ids) if self.ids is not None else self.stop - self.start

    @property
    def holds_all(self) -> bool:
        return self.count == self.num_experts

    def holds(self, expert: int) -> bool:
        """Whether layer-wide expert ``expert`` is held here."""
        if self.ids is None:
            return self.start <= expert < self.stop
        return expert in self._slots()

    def slot(self, expert: int) -> int:
        """The stack slot of held expert ``expert`` (ValueError for one held elsewhere)."""
        if not self.holds(expert):
            raise ValueError(f"expert {expert} is not held by this placement")
        return expert - self.start if self.ids is None else self._slots()[expert]

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Layer-wide expert ids (int64, any shape, values in [0, num_experts)) -> their stack slots here,
        -1 for experts held elsewhere. No host sync: a range is arithmetic, a set of ids a table lookup
        (the table is built once per device)."""
        if self.ids is None:
            local = ids - self.start
            return torch.where((local >= 0) & (local < self.count), local, -1)
        return _slot_table(self, ids.device)[ids]

    def _slots(self) -> dict[int, int]:
        return _slot_map(self)


@functools.lru_cache(maxsize=None)
def _slot_map(placement: ExpertPlacement) -> dict[int, int]:
    return {e: j for j, e in enumerate(placement.held)}


@functools.lru_cache(maxsize=None)
def _slot_table(placement: ExpertPlacement, device: torch.device) -> torch.Tensor:
    """int64 [num_experts]: the slot of each held expert, -1 for the others, on ``device``."""
    table = torch.full((placement.num_experts,), -1, dtype=torch.int64)
    table[list(placement.held)] = torch.arange(placement.count)
    return table.to(device)


def inner_width(config: ModelConfig, inner: int | None) -> int:
    """The inner width an experts module holds: ``inner`` (a positive int) or the config's
    moe_intermediate_size for None."""
    if inner is None:
        return config.moe_intermediate_size
    if not isinstance(inner, int) or isinstance(inner, bool) or inner < 1:
        raise ValueError(f"inner must be a positive int, got {inner!r}")
    return inner


def write_expert(module: nn.Module, placement: ExpertPlacement, param: str, expert: int | None,
                 value: torch.Tensor) -> bool:
    """Write checkpoint expert ``expert`` (a layer-wide index) of stacked parameter ``param`` of ``module``, or
    the whole stack for None; False, storing nothing, for an expert ``placement`` puts elsewhere. The one
    copy of the placement logic for the float and the quantized experts."""
    if param not in ("gate_proj", "up_proj", "down_proj"):
        raise ValueError(f"param must be gate_proj, up_proj or down_proj, got {param!r}")
    if expert is None:
        write_parameter(module, param, value)
        return True
    p = placement
    if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < p.num_experts:
        raise ValueError(f"expert must be an int in [0, {p.num_experts}), got {expert!r}")
    if not p.holds(expert):
        return False
    write_parameter(module, param, value, p.slot(expert))
    return True


class Experts(nn.Module):
    """The routed experts a placement puts here, stacked: gate/up [E', I, H], down [E', H, I] (E' = held).

    ``backend`` picks the few-pairs path: "kernel" (the Triton kernel), "torch" (gathered weights) or "auto"
    (the kernel for CUDA inputs, torch elsewhere, so a CPU never needs the Triton interpreter).

    ``inner``: the inner width I each held expert has here (default the config's moe_intermediate_size); a
    tensor-parallel rank splitting the experts along their width holds a narrower part of every expert
    (glmtg/parallel/experts.py). The kernels take I from the tensors' shapes.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, placement: ExpertPlacement | None = None,
                 backend: str = "auto", *, inner: int | None = None) -> None:
        super().__init__()
        placement = ExpertPlacement.of_layer(placement, config)
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
        self.placement = placement
        self.backend = backend
        e, i, h = placement.count, inner_width(config, inner), config.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(e, i, h, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=dtype))

    def load_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Write checkpoint expert ``expert`` (a layer-wide index) of ``param``, or the whole stack for None.
        Returns False, storing nothing, for an expert that the placement puts elsewhere."""
        return write_expert(self, self.placement, param, expert, value)

    def slot_shape(self, param: str) -> tuple[int, ...]:
        """The checkpoint shape of stacked ``param`` (``tensor_slots``): the held experts' stack."""
        return tuple(getattr(self, param).shape)

    def shared_blocks(self, x: torch.Tensor, shared: nn.Module | None) -> None:
        """Never: float experts leave the shared expert to its own module (QuantExperts may fold it in)."""
        return None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] (layer-wide expert ids) -> Σ_k weights * expert_k(x), [T, H] in x's
        dtype; slots routed to experts held elsewhere add nothing."""
        t, k = ids.shape
        held = self.placement.count
        if not self.placement.holds_all:
            local = self.placement.local_ids(ids)
            here = local >= 0
            # The kernel masks ids outside [0, held) itself; the torch paths need valid indices.
            ids = torch.where(here, local, -1 if self._kernel(x, t * k) else 0)
            weights = torch.where(here, weights, 0.0)
        if self._kernel(x, t * k):
            # Reads the chosen experts' weights in place and combines in fp32 inside the kernel;
            # gathered_experts copies them out first (about 3x the weight bytes moved).
            return moe_decode(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights)
        if t * k <= held:
            y = gathered_experts(x, self.gate_proj, self.up_proj, self.down_proj, ids)
        else:
            y = grouped_experts(x, self.gate_proj, self.up_proj, self.down_proj, ids)
        # Combine in fp32: the weights are fp32 and the sum of k terms should round once.
        return (y.float() * weights[..., None]).sum(1).to(x.dtype)

    def _kernel(self, x: torch.Tensor, pairs: int) -> bool:
        use = self.backend == "kernel" or (self.backend == "auto" and x.is_cuda)
        return use and pairs <= self.placement.count


class MoE(nn.Module):
    """Routed experts plus the shared expert: y = Σ_k w_k expert_k(x) + shared(x)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, experts_backend: str = "auto") -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config, dtype, backend=experts_backend)
        self.shared = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype)
                       if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B, S, H] -> [T, H]
        ids, weights = self.router(flat)
        # GGUF experts at decode run the shared expert as one more slot of their kernels (two launches, not
        # five) where its formats match theirs.
        blocks = self.experts.shared_blocks(flat, self.shared)
        if blocks is not None:
            return self.experts(flat, ids, weights, shared=blocks).view(shape)
        out = self.experts(flat, ids, weights)
        if self.shared is not None:
            out = self.shared(flat, residual=out)  # out + shared(flat), the add folded into its last product
        return out.view(shape)


def gathered_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], ids [T, k] -> each slot's expert output [T, k, H]. Copies the chosen experts' weights out and
    batches the products: right for few pairs, and the reference for the kernel."""
    g = torch.einsum("th,tkih->tki", x, gate[ids])  # [T, k, I]
    u = torch.einsum("th,tkih->tki", x, up[ids])
    return torch.einsum("tki,tkhi->tkh", F.silu(g) * u, down[ids])


def grouped_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], ids [T, k] -> each slot's expert output [T, k, H], for many pairs, with no host sync."""
    if grouped_mm_applies(x, gate, down):
        return grouped_mm_experts(x, gate, up, down, ids)
    if x.shape[0] <= DENSE_MAX_TOKENS:
        return dense_experts(x, gate, up, down, ids)
    return looped_experts(x, gate, up, down, ids)


@functools.lru_cache(maxsize=None)
def _grouped_mm_capability(device: torch.device) -> bool:
    # torch's fast grouped GEMM (no host read of the offsets) is built for sm90 and sm100 only; elsewhere
    # torch._grouped_mm loops over groups after copying the offsets to the host.
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_mm_applies(x: torch.Tensor, gate: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``grouped_mm_experts`` runs here without reading the offsets on the host.

    torch._grouped_mm: on CUDA the sync-free path takes bf16 on sm90/sm100 only (other dtypes fall back
    to a loop over groups after ``offs.cpu()``); the CPU takes fp32/fp16/bf16 (its loop reads host memory:
    no device to wait for); the meta device checks bf16 only. Every row of the operands must be a multiple
    of 16 bytes.
    """
    dtype = x.dtype
    if not (dtype == gate.dtype == down.dtype) or not gate.is_contiguous() or not down.is_contiguous():
        return False
    h, i = gate.shape[2], gate.shape[1]
    if (h * dtype.itemsize) % 16 or (i * dtype.itemsize) % 16:
        return False
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and _grouped_mm_capability(x.device)
    if x.device.type == "cpu":
        return dtype in (torch.float32, torch.float16, torch.bfloat16)
    return x.device.type == "meta" and dtype == torch.bfloat16


def grouped_mm_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       ids: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert on the device, then one grouped matmul per projection: each expert's weights
    are read once and no weight is copied. Returns [T, k, H]."""
    t, k = ids.shape
    # pairs p = t * k + slot sorted by expert; ends[e] = pairs routed to experts <= e (the groups' end
    # offsets), computed without leaving the device: the same sort as the GGUF grouped GEMM's
    order, ends = sort_by_expert(ids, gate.shape[0])
    xs = x.index_select(0, order // k)  # [P, H] grouped by expert
    g = torch._grouped_mm(xs, gate.transpose(1, 2), offs=ends)  # [P, I]
    u = torch._grouped_mm(xs, up.transpose(1, 2), offs=ends)
    ys = torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=ends)  # [P, H]
    return torch.empty_like(ys).index_copy_(0, order, ys).view(t, k, -1)


def dense_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """Every expert on every token (in chunks of tokens that bound the memory), then each pair takes its
    expert's output: no host sync for any dtype, at experts/k times the arithmetic. Returns [T, k, H]."""
    t, k = ids.shape
    e, i, h = gate.shape
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // (e * max(h, i)))
    out = []
    for t0 in range(0, t, chunk):
        xc = x[t0:t0 + chunk]  # [c, H]
        xe = xc.expand(e, *xc.shape)  # [E, c, H]
        act = F.silu(torch.bmm(xe, gate.transpose(1, 2))) * torch.bmm(xe, up.transpose(1, 2))  # [E, c, I]
        ye = torch.bmm(act, down.transpose(1, 2))  # [E, c, H]
        rows = torch.arange(xc.shape[0], device=x.device)[:, None]  # [c, 1]
        out.append(ye[ids[t0:t0 + chunk], rows])  # [c, k, H]
    return torch.cat(out)


def looped_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert, one matmul per expert that has pairs: each expert's weights read once, at the
    cost of reading the per-expert counts on the host (one sync). For long inputs only (prefill), where the
    sync-free grouped matmul does not run. Returns [T, k, H]."""
    t, k = ids.shape
    flat = ids.reshape(-1)  # [P = T*k], pair p = token p // k, slot p % k
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]  # [P, H] grouped by expert
    ys = torch.empty_like(xs)
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    start = 0
    for e, c in enumerate(counts):
        if c:
            seg = xs[start:start + c]
            ys[start:start + c] = (F.silu(seg @ gate[e].T) * (seg @ up[e].T)) @ down[e].T
            start += c
    return torch.empty_like(ys).index_copy_(0, order, ys).view(t, k, -1)
