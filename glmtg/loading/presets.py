"""Models without a checkpoint: published shapes (presets) with seeded random weights.

Random weights make speed and memory measurable on any shape without downloading a model; the same
seed gives the same weights on the same kind of device, so two runs of a preset (a KLD base and its
comparison) share them.
"""

from __future__ import annotations

import dataclasses

import torch

from glmtg.config import ModelConfig
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


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype`` (the router stays fp32), counted without allocating.

    Models of one and two layers are built on the meta device (no memory) and the per-layer sizes
    scaled to the real depth, so even a config with millions of layers is measured at once.
    """
    def measure(layers: int, dense: int) -> int:
        small = dataclasses.replace(config, num_hidden_layers=layers, first_k_dense_replace=dense)
        model = Glm4MoeForCausalLM(small, dtype=dtype, device="meta")
        return sum(p.numel() * p.element_size() for p in model.parameters())

    one_dense, one_moe, both = measure(1, 1), measure(1, 0), measure(2, 1)
    dense_layer, moe_layer = both - one_moe, both - one_dense
    rest = one_dense - dense_layer  # embedding, final norm, lm_head
    n_dense = config.first_k_dense_replace
    return rest + n_dense * dense_layer + (config.num_hidden_layers - n_dense) * moe_layer


def random_model(config: ModelConfig, *, seed: int = RANDOM_WEIGHTS_SEED, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu") -> Glm4MoeForCausalLM:
    """Seeded random weights: matrices std 0.02, norms 1, small nonzero biases (so the bias paths are exercised).

    Drawn on the target device (a full-size preset has tens of GB of weights, minutes of CPU time), in
    parameter order from one generator, so the same seed gives the same model on the same kind of device.
    """
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta")
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
        model.load_tensor(slot.name, value.to(dtype=slot.dtype), shard=slot.shard)
    return model.eval()
