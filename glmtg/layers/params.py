"""Assigning weights to parameters at load time: whole tensors without a copy, slices into one buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmtg.formats import REGISTRY


def write_parameter(module: nn.Module, attr: str, value: torch.Tensor, index: int | slice | None = None) -> None:
    """Put ``value`` into ``module``'s parameter ``attr``.

    With ``index`` None the parameter becomes ``value`` itself (no copy: loaders fill a model built on the meta
    device one tensor at a time, so peak memory stays the model plus one tensor). Otherwise ``value`` is
    copied into ``param[index]`` (an expert of a stacked parameter, the rows of one shard of a fused one); a
    parameter still on the meta device is first allocated, uninitialised, on ``value``'s device.
    Raises ValueError naming the parameter when the shape or dtype does not fit.
    """
    old = module._parameters.get(attr)
    if old is None:
        raise ValueError(f"{type(module).__name__} has no parameter {attr!r}")
    want = tuple(old.shape) if index is None else tuple(old[index].shape)
    if tuple(value.shape) != want:
        raise ValueError(f"{attr}: expected shape {want}, got {tuple(value.shape)}")
    if value.dtype != old.dtype:
        raise ValueError(f"{attr}: expected dtype {old.dtype}, got {value.dtype}")
    if index is None:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        return
    if old.is_meta:
        old = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=value.device), requires_grad=False)
        module._parameters[attr] = old
    elif old.device != value.device:
        raise ValueError(f"{attr}: value is on {value.device} but the parameter is on {old.device}")
    with torch.no_grad():
        old[index].copy_(value)


@dataclass(frozen=True)
class TensorSlot:
    """One tensor a checkpoint provides for a model: parameter ``name``, the ``shard`` of a fused parameter it
    fills (None: the whole parameter), its ``shape`` and the ``dtype`` the model keeps it in. A stacked expert
    parameter is one slot; checkpoints split it further by expert (dim 0).

    ``format`` None: a plain float parameter of ``shape``. Otherwise the GGUF block format (a glmtg.formats
    name) the model keeps the slot in: ``shape`` stays the logical one (values: [rows, in_features], or
    [E, rows, in] for experts), ``dtype`` is torch.uint8 and the tensor it takes is the raw blocks,
    ``raw_shape`` = [..., rows, row_bytes].
    """

    name: str
    shard: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    format: str | None = None

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape of the tensor ``load_tensor`` takes for this slot: ``shape`` for a float slot, the last
        dimension counted in bytes of blocks for a quantized one."""
        if self.format is None:
            return self.shape
        return (*self.shape[:-1], REGISTRY[self.format].blocks_bytes(self.shape[-1]))
