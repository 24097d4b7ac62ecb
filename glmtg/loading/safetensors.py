"""Load a GLM4-MoE HF checkpoint directory (config.json + safetensors, single file or sharded).

The model is built on the meta device (no memory), then each checkpoint tensor is memory-mapped, converted to
the parameter's dtype on the target device and written with ``Glm4MoeForCausalLM.load_tensor``, so peak memory
is the model plus one tensor. Routed experts arrive one tensor per expert and are copied into their layer's
stacked parameter; q/k/v and gate/up are copied into their shard of the fused projection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from glmtg.config import ModelConfig
from glmtg.loading.names import expected_hf_names, hf_layer_index, hf_to_glmtg
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_finite(name: str, value: torch.Tensor) -> None:
    """Refuse NaN/inf weights: a model with them computes NaN logits (PPL = nan) or garbage silently.

    Checked after the conversion to the model's dtype, so values that overflow it (f32 -> f16) count too.
    """
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"tensor {name} holds {bad} non-finite value(s) (NaN or inf) in {_dtype_name(value.dtype)}: "
                         f"the checkpoint is corrupt")


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Glm4MoeForCausalLM, ModelConfig]:
    """Load config and weights from an HF directory. MTP/nextn layers (index >= num_hidden_layers) are skipped.

    Bad input (missing/corrupt files, missing or unexpected tensors, wrong shapes, non-float dtypes, NaN/inf
    values, wrong model_type) raises ValueError with a one-line message naming the file or tensor.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model path {root} is not a directory")
    config = ModelConfig.from_hf_json(root / "config.json")
    files = checkpoint_files(root)

    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta")
    expected = expected_hf_names(model.tensor_slots())
    seen: set[str] = set()
    total = sum(len(names) for names in files.values())
    skipped = 0
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file, names in files.items():
            with _open(file) as f:
                present = set(f.keys())
                for hf_name in names:
                    bar.update(1)
                    if hf_name not in present:
                        raise ValueError(f"{os.path.basename(file)} lacks tensor {hf_name} listed in its index")
                    layer = hf_layer_index(hf_name)
                    if layer is not None and layer >= config.num_hidden_layers:
                        skipped += 1  # MTP/nextn layer: not used for plain decoding
                        continue
                    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied to the embedding, which is loaded under its own name
                    if hf_name not in expected:
                        known = hf_to_glmtg(hf_name) is not None
                        why = "does not fit this config" if known else "is not a GLM4-MoE tensor"
                        raise ValueError(f"tensor {hf_name} in {os.path.basename(file)} {why}")
                    slot, expert = expected[hf_name]
                    want = slot.shape[1:] if expert is not None else slot.shape
                    try:
                        tensor = f.get_tensor(hf_name)
                    except Exception as e:
                        raise ValueError(f"cannot read {hf_name} from {os.path.basename(file)}: {e}") from None
                    if tuple(tensor.shape) != want:
                        raise ValueError(f"tensor {hf_name} has shape {tuple(tensor.shape)}, expected {want}")
                    if not tensor.is_floating_point():
                        raise ValueError(f"tensor {hf_name} has dtype {_dtype_name(tensor.dtype)}; weights must be "
                                         f"floating point")
                    # each parameter keeps the dtype the model gave it (the router stays fp32)
                    value = tensor.to(device=device, dtype=slot.dtype)
                    _check_finite(hf_name, value)
                    model.load_tensor(slot.name, value, shard=slot.shard, expert=expert)
                    seen.add(hf_name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {root}, e.g. {missing[0]}")
    return model.eval(), config
