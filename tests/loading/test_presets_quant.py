"""Random quantized presets: the float model's values, quantized slot by slot to llama.cpp's mix.

Tolerance of the logits comparison: the reference is a float32 model holding exactly the values the blocks
decode to (registry decoder), so the two differ only in float32 summation order (as
tests/layers/test_quant_model.py): rtol 1e-4 / atol 2e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.formats import REGISTRY
from glmtg.formats.gguf_quantize import quantize_blocks
from glmtg.loading.presets import check_file_type, random_model, weight_bytes
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import new_cache

TINY = ModelConfig.preset("tiny")
# 256-wide rows everywhere but the experts' down projection (width 32): k-quants and their fallbacks both occur
WIDE = dataclasses.replace(TINY, hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
                           num_hidden_layers=3)


@pytest.mark.parametrize("file_type", ("Q8_0", "Q4_K_M"))
def test_quantized_slots_are_the_float_values_quantized(file_type):
    base = random_model(WIDE, seed=3, dtype=torch.bfloat16)
    quant = random_model(WIDE, seed=3, dtype=torch.bfloat16, file_type=file_type)
    base_values = {(s.name, s.shard): v for s, v in base.slot_tensors()}
    formats = set()
    for slot, value in quant.slot_tensors():
        want = base_values[slot.name, slot.shard]
        if slot.format is None:
            assert torch.equal(value, want), slot
        else:
            formats.add(slot.format)
            assert value.dtype == torch.uint8 and tuple(value.shape) == slot.raw_shape
            assert torch.equal(value, quantize_blocks(want, slot.format)), slot
    if file_type == "Q4_K_M":  # the mix: k-quants, v/down with more bits, 32-wide fallbacks
        assert {"q4_k", "q6_k", "q5_0"} <= formats, formats
    else:
        assert formats == {"q8_0"}


def test_logits_match_the_dequantized_float_model():
    model = random_model(WIDE, seed=4, dtype=torch.float32, file_type="Q4_K_M")
    ref = Glm4MoeForCausalLM(WIDE, dtype=torch.float32, device="meta")
    for slot, value in model.slot_tensors():
        if slot.format:
            value = REGISTRY[slot.format].dequantize_blocks(value).float()
        ref.load_tensor(slot.name, value.clone(), shard=slot.shard)
    ids = torch.randint(0, WIDE.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(ids, new_cache(WIDE, 2, 5))
    torch.testing.assert_close(logits, ref(ids, new_cache(WIDE, 2, 5)), rtol=1e-4, atol=2e-5)
    # and near the unquantized model of the same seed (an unrelated model would be ~1.4 off: two independent
    # logit vectors of one spread); measured 0.12 (Q4_0 0.16, Q8_0 0.014)
    base = random_model(WIDE, seed=4, dtype=torch.float32)(ids, new_cache(WIDE, 2, 5))
    rel = float((logits - base).norm() / base.norm())
    assert 0 < rel < 0.4, rel


def test_weight_bytes_counts_the_mix():
    for file_type in ("Q8_0", "Q4_K_M"):
        model = random_model(WIDE, seed=0, dtype=torch.bfloat16, file_type=file_type)
        assert weight_bytes(WIDE, torch.bfloat16, file_type) == sum(
            p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(WIDE, torch.bfloat16, "Q4_0") < weight_bytes(WIDE, torch.bfloat16) / 2


def test_bad_file_type():
    with pytest.raises(ValueError, match="file_type must be one of"):
        random_model(TINY, file_type="Q4_K")
    with pytest.raises(ValueError, match="cannot quantize yet"):
        check_file_type(WIDE, "IQ2_XXS")  # iq2_xxs: a grid type, no quantizer
    check_file_type(TINY, None)
