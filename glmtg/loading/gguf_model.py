"""Load a GLM4-MoE model from a llama.cpp GGUF file (single or split), quantized weights kept as raw blocks.

The mirror of glmtg/loading/safetensors.py for GGUF: the config comes from the file's ``glm4moe.*`` keys, the
model is built on the meta device with each weight matrix in its file's type (``weight_formats``: a quantized
tensor stays in its block format, F32/F16/BF16 become float in the model's dtype), then every tensor's bytes go
from the memory map straight to their slot on the target device, one tensor at a time: peak memory is the
model plus one tensor, and no float copy of a quantized weight is ever made. Expert stacks
(``ffn_*_exps``) are one tensor each, ``[E, rows, row_bytes]``, written whole.

The next-token-prediction (MTP) blocks, numbered after the main layers, are not used for decoding: their
tensors stay in the file (listed, loadable) and are skipped here.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from glmtg.config import ModelConfig
from glmtg.cpu.host_experts import HostExperts
from glmtg.cpu.placement import HostPlacement
from glmtg.cpu.split_experts import SplitExperts
from glmtg.formats import dequantize_blocks
from glmtg.layers.params import TensorSlot
from glmtg.loading.gguf import GGUFFile, GGUFTensorInfo, open_gguf
from glmtg.loading.gguf_config import gguf_config
from glmtg.loading.names import (
    expected_gguf_names,
    gguf_block_index,
    gguf_to_glmtg,
    is_gguf_layer_name,
)
from glmtg.models.glm4_moe import Glm4MoeForCausalLM, WeightFormats

# ggml's float types: these load as float parameters in the model's dtype
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _format_of(info: GGUFTensorInfo) -> str | None:
    """The glmtg format a tensor keeps in the model: None for a float type, else its block format's name."""
    return None if info.type_name in FLOAT_TYPES else info.type_name.lower()


def _main_tensors(f: GGUFFile, config: ModelConfig) -> dict[str, GGUFTensorInfo]:
    """The tensors of the main model: everything but the MTP blocks (blocks >= num_hidden_layers)."""
    out = {}
    for name, info in f.tensors.items():
        block = gguf_block_index(name)
        if block is None or block < config.num_hidden_layers:
            out[name] = info
    return out


def weight_formats_of(f: GGUFFile, config: ModelConfig) -> Callable[[str, str | None], str | None]:
    """``Glm4MoeForCausalLM``'s ``weight_formats`` for this file: the block format of each weight matrix's
    tensor, None for one stored as F32/F16/BF16 (or absent: the model reports what is missing later)."""
    formats = {}
    for name, info in _main_tensors(f, config).items():
        target = gguf_to_glmtg(name)
        if target is not None:
            formats[target] = _format_of(info)

    def weight_formats(name: str, shard: str | None) -> str | None:
        return formats.get((name, shard))

    return weight_formats


def _raw(f: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    """The tensor's bytes as a CPU uint8 tensor over the memory map ([..., row_bytes]; no copy)."""
    data = f.tensor_bytes(info.name)
    with warnings.catch_warnings():
        # torch warns that the view is read-only; it is only ever copied from
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(data)
    return t.view(*info.shape[:-1], -1) if info.nbytes else t.view(*info.shape[:-1], 0)


def _held_experts(model: Glm4MoeForCausalLM, slot: TensorSlot, info: GGUFTensorInfo) -> slice | None:
    """The experts [start, stop) of the file's stack ``info`` that the slot's module holds when that is not
    all of them (a tensor-parallel rank's range), else None."""
    module = model.get_submodule(slot.name.rpartition(".")[0])
    placement = getattr(module, "placement", None)
    if placement is None or placement.holds_all or len(info.shape) != 3 or info.shape[0] != placement.num_experts:
        return None  # a stack of another size fails _check against the slot's shape
    return slice(placement.start, placement.stop)


def _value(f: GGUFFile, info: GGUFTensorInfo, slot: TensorSlot, device: torch.device,
           held: slice | None = None, part: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor as its slot takes it, on ``device``: raw blocks for a quantized slot, else float values in
    the slot's dtype (a quantized tensor in a float slot, such as a quantized router, is dequantized).
    ``held``: the experts of a stack to read (the rest are not copied off the map). ``part`` (quantized
    slots): the rank's part of the raw blocks, cut on the host so that only it goes to ``device``."""
    raw = _raw(f, info)
    if held is not None:
        raw = raw[held]
    if slot.format is not None:
        if part is not None:
            return part(raw).to(device=device, copy=True)  # the part only to the device (never a view of the map)
        return raw.to(device=device, copy=True)  # the only copy: map -> device
    if info.type_name in FLOAT_TYPES:
        values = raw.view(FLOAT_TYPES[info.type_name])  # [..., row_bytes] -> [..., values]
        value = values.to(device=device, dtype=slot.dtype, copy=True)
    else:
        value = dequantize_blocks(raw.to(device), info.type_name.lower()).to(slot.dtype)
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"tensor {info.name} holds {bad} non-finite value(s) (NaN or inf): the file is corrupt")
    return value


def _check(info: GGUFTensorInfo, slot: TensorSlot, held: slice | None = None) -> None:
    shape = tuple(info.shape)
    if held is not None:  # the file's whole stack; the slot holds the placement's experts
        shape = (held.stop - held.start, *shape[1:])
    if shape != tuple(slot.shape):
        raise ValueError(f"tensor {info.name} has shape {list(info.shape)} (torch order), expected "
                         f"{list(slot.shape)}")
    want = slot.format
    if want is not None and info.type_name.lower() != want:
        raise ValueError(f"tensor {info.name} is {info.type_name} but the model keeps it as {want}")


def load_gguf_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    experts_backend: str = "auto",
    progress: bool = True,
    build: Callable[[ModelConfig, WeightFormats], Glm4MoeForCausalLM] | None = None,
    host_experts: HostPlacement | None = None,
) -> tuple[Glm4MoeForCausalLM, ModelConfig]:
    """Load config and weights from a GGUF file (``NAME-00001-of-0000N.gguf``: the whole split set).

    ``build(config, weight_formats)``: the model to fill, on the meta device (None: the whole
    ``Glm4MoeForCausalLM``), e.g. one tensor-parallel rank's part (``glmtg.parallel.build_tp_model``), whose
    modules keep their part of each whole tensor; an expert stack placed partly here (``placement``) is read
    for the held experts only, and one split along the experts' width (``kept_part``) is cut on the host, so
    only the rank's part goes to ``device``. A built model may also list fewer tensors than the whole model (a layer-split
    stage, ``glmtg.parallel.LayerSplitModel``): the file is checked against the whole model's tensor table and
    the tensors the model does not list are never read.

    ``host_experts`` (glmtg.cpu.placement.HostPlacement, with the whole model only): the layers whose routed
    expert stacks go from the memory map straight into one host arena, in their blocks, never to ``device``
    (``Glm4MoeForCausalLM``'s ``host_experts``).

    Bad input (an unreadable or malformed file, another architecture, missing or unexpected tensors, wrong
    shapes or types, NaN/inf float weights) raises ValueError with a one-line message naming the tensor.
    """
    device = torch.device(device)
    with open_gguf(path) as f:
        config = gguf_config(f)
        formats = weight_formats_of(f, config)
        if host_experts and build is not None:
            raise ValueError("host_experts cannot be combined with build (a split model) yet")
        whole = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", experts_backend=experts_backend,
                                   weight_formats=formats, host_experts=host_experts)
        model = whole if build is None else build(config, formats)
        # every tensor of the whole model (on meta: no memory), and the ones this model takes
        table = expected_gguf_names(whole.tensor_slots())
        expected = table if model is whole else expected_gguf_names(model.tensor_slots())
        tensors = _main_tensors(f, config)
        first = f.paths[0]
        # file order (by part, then offset): the map is read front to back
        order = sorted(tensors.values(), key=lambda t: (t.part, t.offset))
        with tqdm(total=sum(t.nbytes for t in order if t.name in expected), desc="loading weights", unit="B",
                  unit_scale=True, disable=not progress) as bar:
            for info in order:
                slot = expected.get(info.name)
                if slot is None:
                    if info.name in table:  # another stage's: its shape and type checked, its bytes not read
                        _check(info, table[info.name])
                        continue
                    known = is_gguf_layer_name(info.name) or gguf_to_glmtg(info.name) is not None
                    why = "does not fit this config" if known else "is not a glm4moe tensor"
                    raise ValueError(f"{first}: tensor {info.name} {why}")
                held = _held_experts(model, slot, info)
                _check(info, slot, held)
                module_name, _, attr = slot.name.rpartition(".")
                module = model.get_submodule(module_name)
                if isinstance(module, SplitExperts):  # each expert copied once, to the device or the arena
                    module.load_split(attr, _raw(f, info), device)
                    bar.update(info.nbytes)
                    continue
                kept_part = getattr(module, "kept_part", None) if slot.format is not None else None
                if isinstance(module, HostExperts):
                    value = _raw(f, info)  # copied once, from the map into the host arena
                elif kept_part is not None:  # experts split along their width: the rank's part of the stack
                    module.load_kept_expert(attr, None, _value(f, info, slot, device, held,
                                                               part=functools.partial(kept_part, attr)))
                    bar.update(info.nbytes)
                    continue
                else:
                    value = _value(f, info, slot, device, held)
                model.load_tensor(slot.name, value, shard=slot.shard)
                bar.update(info.nbytes)
        missing = [name for name in table if name not in tensors]
        if missing:
            raise ValueError(f"{first}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    _check_allocated(model, first)
    return model.eval(), config


def _check_allocated(model: Glm4MoeForCausalLM, path: str) -> None:
    # every slot was written, so a parameter left on meta is a model/loader mismatch, not a file problem
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{path}: parameter {left[0]} was not loaded")


def gguf_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """GGUF name -> bytes in the file of every tensor the model loads (MTP blocks left out), from the tensor
    table alone."""
    with open_gguf(path) as f:
        return {name: info.nbytes for name, info in _main_tensors(f, gguf_config(f)).items()}


def gguf_weight_bytes(path: str | os.PathLike, dtype: torch.dtype) -> int:
    """Bytes the loaded weights take on the device: quantized tensors as stored, float ones in ``dtype``
    (the router in float32), MTP blocks left out. Read from the tensor table alone."""
    with open_gguf(path) as f:
        config = gguf_config(f)
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name, info in _main_tensors(f, config).items():
            if info.type_name not in FLOAT_TYPES:
                total += info.nbytes
            else:
                per = 4 if "ffn_gate_inp" in name or "exp_probs_b" in name else size
                total += int(np.prod(info.shape)) * per
        return total
