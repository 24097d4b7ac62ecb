"""Load a GLM4-MoE HF checkpoint directory (config.json + safetensors, single file or sharded).

The model is built on the meta device (no memory), then each checkpoint tensor is memory-mapped, converted to
the parameter's dtype on the target device and written with ``Glm4MoeForCausalLM.load_tensor``, so peak memory
is the model plus one tensor. Routed experts arrive one tensor per expert and are copied into their layer's
stacked parameter; q/k/v and gate/up are copied into their shard of the fused projection.

A part of the model (``load_model(build=...)``: a tensor-parallel rank, a layer-split stage) reads only its
tensors, and of a tensor-parallel linear only the rows or columns it keeps (``kept``/``load_kept``,
glmtg/parallel/linear.py) through safetensors' ``get_slice``; every tensor's name, shape and dtype are still
checked against the whole model's table from the file header, so a split load refuses what a whole load does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from glmtg.config import ModelConfig
from glmtg.layers.params import TensorSlot
from glmtg.loading.names import expected_hf_names, hf_layer_index, hf_to_glmtg
from glmtg.models.glm4_moe import Glm4MoeForCausalLM, WeightFormats

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike) -> dict[str, list[str]]:
    """file path -> tensor names it holds (per the index when sharded, else the file's own header)."""
    root = Path(path)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: weight_map must be an object")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(root / file), []).append(name)
        for file in files:
            if not os.path.isfile(file):
                raise ValueError(f"shard {os.path.basename(file)} listed in {INDEX_FILE} is missing from {root}")
        return dict(sorted(files.items()))
    single = root / SINGLE_FILE
    if single.is_file():
        with _open(str(single)) as f:
            return {str(single): list(f.keys())}
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers / truncated files
        raise ValueError(f"cannot read safetensors file {file}: {e}") from None


# safetensors' dtype codes -> torch's names (for messages; a code not listed is shown as the file spells it)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
              "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _is_float(code: str) -> bool:
    return code == "BF16" or code.startswith("F")


def _check_finite(name: str, value: torch.Tensor) -> None:
    """Refuse NaN/inf weights: a model with them computes NaN logits (PPL = nan) or garbage silently.

    Checked after the conversion to the model's dtype, so values that overflow it (f32 -> f16) count too.
    """
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        dtype = str(value.dtype).removeprefix("torch.")
        raise ValueError(f"tensor {name} holds {bad} non-finite value(s) (NaN or inf) in {dtype}: "
                         f"the checkpoint is corrupt")


def _target(model: torch.nn.Module, wanted: dict[tuple[str, str | None], TensorSlot], slot: TensorSlot,
            expert: int | None) -> tuple[torch.nn.Module | None, tuple[slice, ...] | None] | None:
    """How ``model`` takes the whole model's ``slot`` (expert ``expert``): None when it does not (another
    stage's tensor, an expert placed on another rank); (None, None) when ``model.load_tensor`` takes it whole;
    (linear, index) when a tensor-parallel linear keeps ``whole[index]`` (its ``load_kept``), (experts,
    index) when width-split experts keep ``whole[index]`` of each expert (their ``load_kept_expert``)."""
    if (slot.name, slot.shard) not in wanted:
        return None
    module = model.get_submodule(slot.name.rpartition(".")[0])
    if expert is not None:
        placement = getattr(module, "placement", None)
        if placement is not None and not placement.start <= expert < placement.stop:
            return None
        kept_expert = getattr(module, "kept_expert", None)
        return (None, None) if kept_expert is None else (module, kept_expert(slot.name.rpartition(".")[2]))
    kept = getattr(module, "kept", None)
    if kept is None:
        return None, None
    return module, kept(slot.name.rpartition(".")[2], slot.shard)


def _read(f: Any, name: str, file: str, index: tuple[slice, ...] | None) -> torch.Tensor:
    """Tensor ``name`` of the open file, whole (``index`` None or ``()``) or only ``whole[index]`` (read by
    get_slice: the bytes of the other rows or columns are not read)."""
    try:
        return f.get_tensor(name) if not index else f.get_slice(name)[index]
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
        raise ValueError(f"cannot read {name} from {os.path.basename(file)}: {e}") from None


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    build: Callable[[ModelConfig, WeightFormats | None], Any] | None = None,
) -> tuple[Glm4MoeForCausalLM, ModelConfig]:
    """Load config and weights from an HF directory. MTP/nextn layers (index >= num_hidden_layers) are skipped.

    ``build(config, None)``: the model to fill, on the meta device, as ``load_gguf_model``'s ``build`` (None:
    the whole ``Glm4MoeForCausalLM``; the second argument is ``weight_formats``, None: the checkpoint's
    weights are float). A tensor-parallel rank (``glmtg.parallel.build_tp_model``) reads the rows (q/k/v by
    heads, gate/up by intermediate columns) or the input columns (o_proj, down) its linears keep, through
    ``get_slice``, and only the routed experts its placement holds (experts split along their width: each
    expert's rows or columns the rank keeps, ``kept_expert``); it reads whole what it keeps whole: the
    embedding, lm_head, norms, router and score bias, the row-parallel biases and each held expert's
    tensors. A layer-split stage (``glmtg.parallel.LayerSplitModel``) reads its layers' tensors whole and
    never the others'. Tensors the built model does not take are still checked (name, shape, dtype, from the
    header alone); a non-finite value is found by the rank that reads it.

    Bad input (missing/corrupt files, missing or unexpected tensors, wrong shapes, non-float dtypes, NaN/inf
    values, wrong model_type) raises ValueError with a one-line message naming the file or tensor.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model path {root} is not a directory")
    config = ModelConfig.from_hf_json(root / "config.json")
    files = checkpoint_files(root)

    whole = Glm4MoeForCausalLM(config, dtype=dtype, device="meta")
    model = whole if build is None else build(config, None)
    # every tensor of the whole model (judges the file), and the ones this model takes
    table = expected_hf_names(whole.tensor_slots())
    wanted = {(slot.name, slot.shard): slot for slot in model.tensor_slots()}
    targets = {name: _target(model, wanted, slot, expert) for name, (slot, expert) in table.items()}
    seen: set[str] = set()
    total = sum(1 for names in files.values() for name in names if targets.get(name) is not None)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file, names in files.items():
            with _open(file) as f:
                present = set(f.keys())
                for hf_name in names:
                    if hf_name not in present:
                        raise ValueError(f"{os.path.basename(file)} lacks tensor {hf_name} listed in its index")
                    layer = hf_layer_index(hf_name)
                    if layer is not None and layer >= config.num_hidden_layers:
                        continue  # MTP/nextn layer: not used for plain decoding
                    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied to the embedding, which is loaded under its own name
                    if hf_name not in table:
                        known = hf_to_glmtg(hf_name) is not None
                        why = "does not fit this config" if known else "is not a GLM4-MoE tensor"
                        raise ValueError(f"tensor {hf_name} in {os.path.basename(file)} {why}")
                    slot, expert = table[hf_name]
                    _check_header(f, hf_name, file, slot.shape[1:] if expert is not None else slot.shape)
                    seen.add(hf_name)
                    target = targets[hf_name]
                    if target is None:
                        continue  # another rank's: checked above, not read
                    module, index = target
                    # each parameter keeps the dtype the model gave it (the router stays fp32)
                    value = _read(f, hf_name, file, index).to(device=device, dtype=slot.dtype)
                    _check_finite(hf_name, value)
                    if module is None:
                        model.load_tensor(slot.name, value, shard=slot.shard, expert=expert)
                    elif expert is not None:
                        module.load_kept_expert(slot.name.rpartition(".")[2], expert, value.contiguous())
                    else:
                        module.load_kept(slot.name.rpartition(".")[2], slot.shard, value.contiguous())
                    bar.update(1)
    missing = [name for name in table if name not in seen]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {root}, e.g. {missing[0]}")
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:  # every slot was written, so this is a model/loader mismatch, not a checkpoint problem
        raise RuntimeError(f"{root}: parameter {left[0]} was not loaded")
    return model.eval(), config


def _check_header(f: Any, name: str, file: str, want: tuple[int, ...]) -> None:
    """The tensor's shape and dtype from the file header (no data read): ValueError naming it."""
    try:
        view = f.get_slice(name)
        shape, code = tuple(view.get_shape()), view.get_dtype()
    except Exception as e:
        raise ValueError(f"cannot read {name} from {os.path.basename(file)}: {e}") from None
    if shape != tuple(want):
        raise ValueError(f"tensor {name} has shape {shape}, expected {tuple(want)}")
    if not _is_float(code):
        raise ValueError(f"tensor {name} has dtype {_ST_DTYPES.get(code, code)}; weights must be floating point")
