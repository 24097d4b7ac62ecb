"""Models without a checkpoint: published shapes (presets) with seeded random weights.

Random weights make speed and memory measurable on any shape without downloading a model; the same
seed gives the same weights on the same kind of device, so two runs of a preset (a KLD base and its
comparison) share them. With a llama.cpp file type (``Q4_K_M``, ...) each weight matrix is those same values
quantized to the GGUF block format llama-quantize would give it (glmtg/formats/mix.py): a quantized model
and its float base differ only by the quantization.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from glmtg.config import ModelConfig
from glmtg.cpu.placement import HostPlacement
from glmtg.formats import REGISTRY
from glmtg.formats.gguf_quantize import QUANTIZABLE, quantize_blocks
from glmtg.formats.mix import FILE_TYPES, weight_formats_for
from glmtg.loading.byte_tokenizer import ByteTokenizer
from glmtg.loading.names import expected_gguf_names
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

RANDOM_WEIGHTS_SEED = 0  # what the CLI uses, so every command on a preset sees the same model


def preset_config(name: str, n_layers: int | None = None) -> ModelConfig:
    """The config of preset ``name``, optionally cut to its first ``n_layers`` layers.

    Cutting keeps a big preset's per-layer shapes while fitting one device (dense layers stay first).
    """
    config = ModelConfig.preset(name)
    if n_layers is None:
        return config
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if n_layers > config.num_hidden_layers:
        raise ValueError(f"n_layers {n_layers} exceeds the {config.num_hidden_layers} layers of {name}")
    return dataclasses.replace(config, num_hidden_layers=n_layers,
                               first_k_dense_replace=min(config.first_k_dense_replace, n_layers))


def preset_tokenizer(config: ModelConfig) -> ByteTokenizer:
    """The tokenizer of random weights: a preset has no tokenizer files, so one token per UTF-8 byte
    (deterministic: every run on a preset tokenizes a text the same way, as KLD comparisons need)."""
    return ByteTokenizer(config.vocab_size, config.eos_token_ids)


def weight_bytes(config: ModelConfig, dtype: torch.dtype, file_type: str | None = None) -> int:
    """Bytes of the model's parameters in ``dtype`` (the router stays fp32), counted without allocating;
    with ``file_type``, the weight matrices in the formats of that llama.cpp mix.

    Models of one and two layers are built on the meta device (no memory) and the per-layer sizes
    scaled to the real depth, so even a config with millions of layers is measured at once. A mix gives
    layers different formats (the _M mixes), so its layers are counted one by one from their slots.
    """
    if file_type is not None:
        return _mix_bytes(config, dtype, file_type)

    def measure(layers: int, dense: int) -> int:
        small = dataclasses.replace(config, num_hidden_layers=layers, first_k_dense_replace=dense)
        model = Glm4MoeForCausalLM(small, dtype=dtype, device="meta")
        return sum(p.numel() * p.element_size() for p in model.parameters())

    one_dense, one_moe, both = measure(1, 1), measure(1, 0), measure(2, 1)
    dense_layer, moe_layer = both - one_moe, both - one_dense
    rest = one_dense - dense_layer  # embedding, final norm, lm_head
    n_dense = config.first_k_dense_replace
    return rest + n_dense * dense_layer + (config.num_hidden_layers - n_dense) * moe_layer


def _mix_bytes(config: ModelConfig, dtype: torch.dtype, file_type: str) -> int:
    formats = weight_formats_for(file_type, config)

    def template(dense: int) -> list:
        small = dataclasses.replace(config, num_hidden_layers=1, first_k_dense_replace=dense)
        return list(Glm4MoeForCausalLM(small, dtype=dtype, device="meta").tensor_slots())

    def nbytes(slot, name: str) -> int:
        fmt = formats(name, slot.shard)
        if fmt is None:
            return math.prod(slot.shape) * slot.dtype.itemsize
        return math.prod(slot.shape[:-1]) * REGISTRY[fmt].blocks_bytes(slot.shape[-1])

    dense, moe = template(1), template(0)
    total = sum(nbytes(s, s.name) for s in dense if not s.name.startswith("layers."))
    for layer in range(config.num_hidden_layers):
        slots = dense if layer < config.first_k_dense_replace else moe
        total += sum(nbytes(s, f"layers.{layer}." + s.name.removeprefix("layers.0."))
                     for s in slots if s.name.startswith("layers.0."))
    return total


def mix_tensor_bytes(config: ModelConfig, file_type: str) -> dict[str, int]:
    """GGUF name -> bytes of each tensor of ``config``'s model in llama.cpp mix ``file_type`` (as a file of
    that type would store it: blocks, or float in the slot's dtype), counted on the meta device."""
    model = Glm4MoeForCausalLM(config, device="meta", weight_formats=weight_formats_for(file_type, config))
    return {name: math.prod(slot.raw_shape) * (1 if slot.format else slot.dtype.itemsize)
            for name, slot in expected_gguf_names(model.tensor_slots()).items()}


def check_file_type(config: ModelConfig, file_type: str | None) -> None:
    """ValueError unless random weights of ``config`` can be built in llama.cpp mix ``file_type`` (None: float):
    a known file type whose every format glmtg can quantize."""
    if file_type is None:
        return
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}")
    model = Glm4MoeForCausalLM(config, device="meta", weight_formats=weight_formats_for(file_type, config))
    missing = sorted({s.format for s in model.tensor_slots() if s.format and s.format not in QUANTIZABLE})
    if missing:
        raise ValueError(f"file_type {file_type} uses {', '.join(missing)}, which glmtg cannot quantize yet "
                         f"(it quantizes {', '.join(QUANTIZABLE)})")


def random_model(config: ModelConfig, *, seed: int = RANDOM_WEIGHTS_SEED, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", file_type: str | None = None,
                 host_experts: HostPlacement | None = None) -> Glm4MoeForCausalLM:
    """Seeded random weights: matrices std 0.02, norms 1, small nonzero biases (so the bias paths are exercised).

    Drawn on the target device (a full-size preset has tens of GB of weights, minutes of CPU time), in
    parameter order from one generator, so the same seed gives the same model on the same kind of device.
    ``file_type`` (a llama.cpp file type, ``FILE_TYPES``): each weight matrix holds the same values in
    ``dtype``, quantized to the format llama-quantize gives it; the float model's values are drawn and
    rounded to ``dtype`` exactly as without it, so the two share their weights up to the quantization.
    ``host_experts``: layers whose routed experts stay in host memory (needs ``file_type``; the values are the
    same as without it).
    """
    check_file_type(config, file_type)
    formats = None if file_type is None else weight_formats_for(file_type, config)
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", weight_formats=formats,
                               host_experts=host_experts)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    # Slot by slot (q/k/v and gate/up as their own shards), in the model's order: the values a seed gives
    # do not depend on how the model fuses its projections.
    for slot in list(model.tensor_slots()):
        if slot.name.endswith("norm.weight"):
            value = torch.ones(slot.shape, device=device)
        elif slot.name.endswith("e_score_correction_bias"):
            value = randn(slot.shape) * 0.01
        else:  # matrices and the q/k/v biases
            value = randn(slot.shape) * 0.02
        if slot.format is None:
            value = value.to(dtype=slot.dtype)
        else:
            # the float model's values (rounded to dtype), then quantized: one slot's float transient at a time
            value = quantize_blocks(value.to(dtype=dtype), slot.format)
        model.load_tensor(slot.name, value, shard=slot.shard)
    return model.eval()
