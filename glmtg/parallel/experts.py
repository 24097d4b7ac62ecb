"""How a tensor-parallel rank (``-sm graph``) holds the routed experts: by expert or along their inner width.

- ``"expert"``: rank r holds a contiguous range of the E experts, whole (``ExpertPlacement.split``). At batch 1
  the k chosen experts of a token land unevenly on the ranks: the rank holding most of them sets the step's
  time while the others idle.
- ``"width"``: every rank holds all E experts, each cut along its inner width I (moe_intermediate_size): gate
  and up rows [cut] (whole rows: any format), down's input columns [cut] (whole blocks of down's format,
  ``partition_columns``: counts differing by at most one block, so GLM-4.5-Air's 1408 = 44 blocks of 32 splits
  over 8 ranks). Every rank reads 1/N of each chosen expert, whatever the routing. A rank's partial expert
  outputs join the shared expert's partial sum in the MoE's one all-reduce per layer (``ParallelMoE``).

Like the tensor-parallel linears, the width-split experts list whole checkpoint shapes in ``tensor_slots``
(``slot_shape``) and take whole tensors in ``load_expert`` (one expert [rows, row] or the stack [E, rows,
row]), keeping their cut, so every loader hands every rank the same tensors. Loaders that can read less
cut first and hand the part to ``load_kept_expert``: the GGUF loader cuts a stack on the host
(``kept_part``) so that only the part goes to the device; the safetensors loader reads the index the float
ones give (``kept_expert``) with ``get_slice``.

A width of fewer blocks than ranks (the tiny preset's 32 = one block of 32 over 2 ranks) leaves the last
ranks no block: as ``QuantRowParallelLinear``, such a rank holds one block of the inner width with down
columns of zero bytes (scale 0), so its partial sum is exactly 0 while it runs the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from glmtg.config import ModelConfig
from glmtg.formats import REGISTRY
from glmtg.layers.moe import ExpertPlacement, Experts
from glmtg.layers.quant_experts import PARAMS, QuantExperts
from glmtg.parallel.group import TPGroup
from glmtg.parallel.quant_linear import partition_columns, slice_block_columns

EXPERT_SPLITS = ("width", "expert")
# The split build_tp_model and `-sm graph` use when not told: by width, measured faster at batch 1 on 4 GPUs
# (bench/DECISIONS.md K1; batch 32 is not measured yet).
DEFAULT_EXPERTS_SPLIT = "width"


def check_experts_split(experts_split: str) -> str:
    """``experts_split`` if it is one of ``EXPERT_SPLITS``, else ValueError naming the argument."""
    if experts_split not in EXPERT_SPLITS:
        raise ValueError(f"experts_split must be one of {EXPERT_SPLITS}, got {experts_split!r}")
    return experts_split


class WidthCut:
    """``load_expert`` and ``slot_shape`` of experts holding columns ``cols`` of the inner width ``full_inner``
    of every expert (mixed into ``Experts`` / ``QuantExperts``, whose stacks hold ``unit``-wide parts when
    ``cols`` is empty: the zero-block rank of the module docstring)."""

    full_inner: int
    cols: slice
    unit: int

    def _setup_cut(self, full_inner: int, cols: slice, unit: int) -> None:
        self.full_inner, self.cols, self.unit = full_inner, cols, unit

    @property
    def rows(self) -> slice:
        """gate/up rows kept of every expert: ``cols``, or the first ``unit`` rows against zero down columns."""
        return self.cols if self.cols.stop > self.cols.start else slice(0, self.unit)

    def _whole_down_width(self) -> int:
        """The last dimension of a whole checkpoint tensor of down_proj (values, or bytes of blocks)."""
        raise NotImplementedError

    def _down_cut(self, value: torch.Tensor) -> torch.Tensor:
        """Down's kept input columns of a whole [..., H, width] tensor."""
        raise NotImplementedError

    def kept_part(self, param: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part (contiguous) of a whole checkpoint tensor of ``param``: one expert [rows, row] or a
        stack [E, rows, row]. ValueError unless it has the whole tensor's inner width. (The GGUF loader cuts
        a stack on the host with it, then hands the part to ``load_kept_expert``.)"""
        if param not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
        inner_dim = -1 if param == "down_proj" else -2
        want = self._whole_down_width() if param == "down_proj" else self.full_inner
        if value.dim() not in (2, 3) or value.shape[inner_dim] != want:
            raise ValueError(f"{param}: expected a whole expert (or stack) with {want} in dim {inner_dim}, got "
                             f"shape {tuple(value.shape)}")
        if param != "down_proj":
            return value[..., self.rows, :].contiguous()
        return self._down_cut(value).contiguous()

    def load_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Keep this rank's part of whole checkpoint expert ``expert`` (or of the whole stack for None)."""
        return super().load_expert(param, expert, self.kept_part(param, value))  # type: ignore[misc]

    def load_kept_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Write this rank's part of expert ``expert`` (or of the stack for None), already cut by the caller
        (``kept_part``, or the float ones' ``kept_expert`` index)."""
        return super().load_expert(param, expert, value)  # type: ignore[misc]

    def slot_shape(self, param: str) -> tuple[int, ...]:
        """The checkpoint's whole shape of stacked ``param``: every expert, the whole inner width."""
        shape = list(super().slot_shape(param))  # type: ignore[misc]
        shape[-1 if param == "down_proj" else -2] = self.full_inner
        return tuple(shape)


class WidthExperts(WidthCut, Experts):
    """All routed experts, float, each cut to columns ``cols`` of its inner width (non-empty: a float width
    splits on any column)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, cols: slice, backend: str = "auto") -> None:
        super().__init__(config, dtype, backend=backend, inner=cols.stop - cols.start)
        self._setup_cut(config.moe_intermediate_size, cols, 1)

    def _whole_down_width(self) -> int:
        return self.full_inner

    def _down_cut(self, value: torch.Tensor) -> torch.Tensor:
        return value[..., self.cols]

    def kept_expert(self, param: str) -> tuple[slice, ...]:
        """The index into one whole checkpoint expert tensor of ``param`` that this rank keeps (what the
        safetensors loader reads with ``get_slice``): gate/up rows, down's input columns."""
        if param not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
        return (slice(None), self.cols) if param == "down_proj" else (self.cols,)


class QuantWidthExperts(WidthCut, QuantExperts):
    """All routed experts in GGUF blocks, each cut to columns ``cols`` of its inner width: whole blocks of
    down's format (empty: one block of zeros, module docstring)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, formats: Mapping[str, str], cols: slice,
                 backend: str = "auto") -> None:
        unit = REGISTRY[formats["down_proj"]].block_size
        super().__init__(config, dtype, formats, backend=backend, inner=max(cols.stop - cols.start, unit))
        self._setup_cut(config.moe_intermediate_size, cols, unit)

    def _whole_down_width(self) -> int:
        return REGISTRY[self.formats["down_proj"]].blocks_bytes(self.full_inner)

    def _down_cut(self, value: torch.Tensor) -> torch.Tensor:
        fmt = self.formats["down_proj"]
        if self.cols.stop == self.cols.start:  # no block here: one block of zero bytes (scale 0, every value 0)
            return value.new_zeros(*value.shape[:-1], REGISTRY[fmt].type_size)
        return slice_block_columns(value, fmt, self.cols)


def expert_range(config: ModelConfig, tp: TPGroup) -> ExpertPlacement:
    """Rank ``tp.rank``'s range of the experts for the ``"expert"`` split; ValueError when there are fewer
    experts than ranks."""
    if config.n_routed_experts < tp.world_size:
        raise ValueError(f"n_routed_experts ({config.n_routed_experts}) must be at least the tensor-parallel "
                         f"size {tp.world_size} to split the experts by expert")
    return ExpertPlacement.split(config.n_routed_experts, tp.world_size)[tp.rank]


def width_experts(config: ModelConfig, dtype: torch.dtype, tp: TPGroup, formats: Mapping[str, str] | None,
                  backend: str) -> Experts | QuantExperts:
    """Rank ``tp.rank``'s width-split routed experts: GGUF blocks in ``formats`` (cut on down's blocks) or float
    (None: an even-as-possible cut of the columns; ValueError when the width has fewer columns than ranks)."""
    width = config.moe_intermediate_size
    if formats is None:
        cols = partition_columns(width, 1, tp, "moe_intermediate_size")
        if cols.stop == cols.start:
            raise ValueError(f"moe_intermediate_size ({width}) has fewer columns than the {tp.world_size} ranks "
                             "splitting the experts along their width")
        return WidthExperts(config, dtype, cols, backend)
    block = REGISTRY[formats["down_proj"]].block_size
    cols = partition_columns(width, block, tp, f"moe_intermediate_size (experts' down_proj is {formats['down_proj']})")
    return QuantWidthExperts(config, dtype, formats, cols, backend)
