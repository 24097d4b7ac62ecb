"""Random-weight presets: the same seed gives the same weights; sizes are counted without building the model."""

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.loading.presets import preset_config, random_model, weight_bytes
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

TINY = ModelConfig.preset("tiny")


def test_weights_are_drawn_slot_by_slot_in_model_order():
    # The order every earlier preset result was measured with: one generator, one draw per checkpoint
    # tensor (q, k, v, gate and up as their own shards), norms set to one without a draw.
    model = random_model(TINY, seed=5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    for slot, value in model.slot_tensors():
        if slot.name.endswith("norm.weight"):
            want = torch.ones(slot.shape)
        else:
            std = 0.01 if slot.name.endswith("e_score_correction_bias") else 0.02
            want = torch.randn(slot.shape, generator=gen) * std
        assert torch.equal(value, want.to(slot.dtype)), (slot.name, slot.shard)


def test_seeds_differ_and_values_have_the_documented_scales():
    a, b = random_model(TINY, seed=1, dtype=torch.float32), random_model(TINY, seed=2, dtype=torch.float32)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(a.norm.weight, torch.ones(TINY.hidden_size))
    # std 0.02 matrices: 64 000 samples, so the sample std is within 2% of it (about 7 standard errors)
    assert a.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    router = a.layers[TINY.first_k_dense_replace].mlp.router
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.abs().max() < 0.1
    assert not any(p.is_meta for p in a.parameters())


@pytest.mark.parametrize("name, layers", [("tiny", None), ("tiny", 1), ("tiny", 3), ("glm-4.5-air", 2),
                                          ("glm-4.5", 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_bytes_equals_the_built_models_parameters(name, layers, dtype):
    config = preset_config(name, layers)
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta")
    assert weight_bytes(config, dtype) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_weight_bytes_of_a_full_preset_allocates_nothing():
    # GLM-4.5 in bf16: about 705.7 GB (355B parameters at 2 bytes, the router in fp32); counting it must
    # not build the model in host memory (it did once, and the process was killed)
    total = weight_bytes(ModelConfig.preset("glm-4.5"), torch.bfloat16)
    assert 700e9 < total < 712e9
    huge = dataclasses.replace(TINY, num_hidden_layers=10**7)
    per_layer = weight_bytes(preset_config("tiny", 2), torch.float32) - weight_bytes(preset_config("tiny", 1),
                                                                                     torch.float32)
    assert weight_bytes(huge, torch.float32) == weight_bytes(TINY, torch.float32) + (10**7 - 4) * per_layer


def test_preset_config_checks_n_layers():
    assert preset_config("glm-4.5-air", 3).num_hidden_layers == 3
    assert preset_config("glm-4.5-air", 1).first_k_dense_replace == 1
    with pytest.raises(ValueError, match="n_layers 47 exceeds the 46 layers"):
        preset_config("glm-4.5-air", 47)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="n_layers must be a positive int"):
            preset_config("tiny", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("llama")
