"""llama.cpp's per-tensor type choices for GLM4-MoE (glmtg.formats.mix) on the GLM-4.5-Air and GLM-4.5 shapes.

Expected types are worked out by hand from src/llama-quant.cpp (llama_tensor_get_type_impl,
tensor_type_fallback) for these shapes: Air has 46 + 1 next-token blocks (n_layer 47: 47/8 = 5,
7*47/8 = 41, 47/16 = 2), GLM-4.5 92 + 1 (93/8 = 11, 7*93/8 = 81); both GQA ratio 12 and 128/160 experts.
"""

from __future__ import annotations

import pytest

from glmtg.config import ModelConfig
from glmtg.formats import REGISTRY
from glmtg.formats.mix import FILE_TYPES, tensor_type, weight_formats_for
from glmtg.layers.quant_linear import QuantLinear
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

AIR = ModelConfig.preset("glm-4.5-air")
GLM45 = ModelConfig.preset("glm-4.5")
AIR_EXPS_DOWN = (128, 4096, 1408)


@pytest.mark.parametrize("ft,name,shape,want", [
    # Q4_K_M: output Q6_K; attn_v Q6_K on use_more_bits layers (0..4, every third from 7, >= 41)
    ("Q4_K_M", "output.weight", (151552, 4096), "q6_k"),
    ("Q4_K_M", "token_embd.weight", (151552, 4096), "q4_k"),
    ("Q4_K_M", "blk.0.attn_v.weight", (1024, 4096), "q6_k"),
    ("Q4_K_M", "blk.5.attn_v.weight", (1024, 4096), "q4_k"),
    ("Q4_K_M", "blk.7.attn_v.weight", (1024, 4096), "q6_k"),
    ("Q4_K_M", "blk.41.attn_v.weight", (1024, 4096), "q6_k"),
    ("Q4_K_M", "blk.5.attn_q.weight", (12288, 4096), "q4_k"),
    ("Q4_K_M", "blk.5.attn_output.weight", (4096, 12288), "q4_k"),
    # ffn_down: Q6_K on use_more_bits layers -> Q8_0 at width 1408; Q4_K elsewhere -> Q5_0
    ("Q4_K_M", "blk.1.ffn_down_exps.weight", AIR_EXPS_DOWN, "q8_0"),
    ("Q4_K_M", "blk.5.ffn_down_exps.weight", AIR_EXPS_DOWN, "q5_0"),
    ("Q4_K_M", "blk.6.ffn_down_shexp.weight", (4096, 1408), "q5_0"),
    ("Q4_K_M", "blk.0.ffn_down.weight", (4096, 10944), "q8_0"),
    ("Q4_K_M", "blk.3.ffn_gate_exps.weight", (128, 1408, 4096), "q4_k"),
    ("Q4_K_M", "blk.3.ffn_gate_inp.weight", (128, 4096), "f32"),
    ("Q4_K_M", "blk.3.attn_norm.weight", (4096,), "f32"),
    ("Q4_K_M", "blk.3.attn_q.bias", (12288,), "f32"),
    # Q4_0: all Q4_0 but the head
    ("Q4_0", "output.weight", (151552, 4096), "q6_k"),
    ("Q4_0", "blk.1.ffn_down_exps.weight", AIR_EXPS_DOWN, "q4_0"),
    ("Q4_0", "blk.0.attn_v.weight", (1024, 4096), "q4_0"),
    ("Q8_0", "output.weight", (151552, 4096), "q8_0"),
    # IQ4_XS: attn_v Q5_K (GQA >= 4); first eighth of ffn_down Q5_K -> Q5_1 at 1408; else IQ4_XS -> IQ4_NL
    ("IQ4_XS", "blk.9.attn_v.weight", (1024, 4096), "q5_k"),
    ("IQ4_XS", "blk.2.ffn_down_exps.weight", AIR_EXPS_DOWN, "q5_1"),
    ("IQ4_XS", "blk.10.ffn_down_exps.weight", AIR_EXPS_DOWN, "iq4_nl"),
    ("IQ4_XS", "blk.10.ffn_up_exps.weight", (128, 1408, 4096), "iq4_xs"),
    # IQ2_XXS: embedding Q2_K, head Q5_K, attn_v Q4_K; the first 47/8 = 5 ffn_down tensors by count
    # (blk.0 dense, blk.1 exps+shexp, blk.2 exps+shexp) Q2_K -> Q4_0 at these widths; then IQ2_XXS -> IQ4_NL
    ("IQ2_XXS", "token_embd.weight", (151552, 4096), "q2_k"),
    ("IQ2_XXS", "output.weight", (151552, 4096), "q5_k"),
    ("IQ2_XXS", "blk.20.attn_v.weight", (1024, 4096), "q4_k"),
    ("IQ2_XXS", "blk.0.ffn_down.weight", (4096, 10944), "q4_0"),
    ("IQ2_XXS", "blk.2.ffn_down_shexp.weight", (4096, 1408), "q4_0"),
    ("IQ2_XXS", "blk.3.ffn_down_exps.weight", AIR_EXPS_DOWN, "iq4_nl"),
    ("IQ2_XXS", "blk.3.attn_output.weight", (4096, 12288), "iq2_xxs"),
    ("IQ1_S", "blk.3.attn_output.weight", (4096, 12288), "iq2_xxs"),
    ("IQ2_S", "blk.3.attn_q.weight", (12288, 4096), "iq2_xs"),  # IQ2_S's default type is IQ2_XS
    ("IQ2_S", "token_embd.weight", (151552, 4096), "iq3_s"),
    ("IQ3_XXS", "blk.3.attn_k.weight", (1024, 4096), "iq2_s"),
    # Q3_K_M: attn_v Q5_K for the first two, Q4_K after; ffn_down Q5_K below 47/16 = 2 (-> Q5_1), Q4_K after
    ("Q3_K_M", "blk.1.attn_v.weight", (1024, 4096), "q5_k"),
    ("Q3_K_M", "blk.2.attn_v.weight", (1024, 4096), "q4_k"),
    ("Q3_K_M", "blk.1.ffn_down_exps.weight", AIR_EXPS_DOWN, "q5_1"),
    ("Q3_K_M", "blk.5.ffn_down_exps.weight", AIR_EXPS_DOWN, "q5_0"),
    ("Q3_K_M", "blk.5.attn_output.weight", (4096, 12288), "q4_k"),
    ("Q2_K", "blk.5.attn_output.weight", (4096, 12288), "q3_k"),
    ("Q2_K", "blk.5.ffn_down_exps.weight", AIR_EXPS_DOWN, "q4_0"),
    ("Q4_K_S", "blk.3.attn_v.weight", (1024, 4096), "q5_k"),
    ("Q4_K_S", "blk.4.attn_v.weight", (1024, 4096), "q4_k"),
    ("F16", "blk.5.ffn_down_exps.weight", AIR_EXPS_DOWN, "f16"),
    ("BF16", "output.weight", (151552, 4096), "bf16"),
    ("BF16", "blk.0.attn_norm.weight", (4096,), "f32"),
])
def test_air_choices(ft, name, shape, want):
    assert tensor_type(ft, name, shape, AIR) == want


def test_iq3_xxs_ffn_down_note():
    # IQ3_XXS without an importance matrix: Q4_K below layer 47/8 = 5, Q3_K after; at width 1408 both fall
    # back (Q4_K -> Q5_0, Q3_K -> Q4_0)
    assert tensor_type("IQ3_XXS", "blk.3.ffn_down_exps.weight", AIR_EXPS_DOWN, AIR) == "q5_0"
    assert tensor_type("IQ3_XXS", "blk.5.ffn_down_exps.weight", AIR_EXPS_DOWN, AIR) == "q4_0"


@pytest.mark.parametrize("name,want", [
    ("blk.3.ffn_down_exps.weight", "q6_k"),  # 3 < 93/8 = 11; width 1536 takes 256-blocks: no fallback
    ("blk.11.ffn_down_exps.weight", "q4_k"),
    ("blk.13.ffn_down_exps.weight", "q6_k"),  # (13 - 11) % 3 == 2
    ("blk.81.ffn_down_shexp.weight", "q6_k"),  # >= 7*93/8 = 81
    ("blk.0.ffn_down.weight", "q6_k"),  # dense width 12288
])
def test_glm45_q4_k_m(name, want):
    shape = {"exps": (160, 5120, 1536), "shexp": (5120, 1536)}.get(name.split("_")[-1].split(".")[0], (5120, 12288))
    assert tensor_type("Q4_K_M", name, shape, GLM45) == want


@pytest.mark.parametrize("config", (AIR, GLM45), ids=("air", "glm-4.5"))
def test_every_choice_tiles_its_rows(config):
    slots = list(Glm4MoeForCausalLM(config, device="meta").tensor_slots())
    for ft in FILE_TYPES:
        formats = weight_formats_for(ft, config)
        for slot in slots:
            fmt = formats(slot.name, slot.shard)
            if slot.name.endswith(("norm.weight", "bias")) or ".router." in slot.name:
                assert fmt is None, slot
                continue
            assert fmt in REGISTRY and slot.shape[-1] % REGISTRY[fmt].block_size == 0, (ft, slot, fmt)


def test_model_from_mix():
    formats = weight_formats_for("Q4_K_M", AIR)
    model = Glm4MoeForCausalLM(AIR, device="meta", weight_formats=formats)
    qkv = model.layers[0].attn.qkv
    assert isinstance(qkv, QuantLinear) and [g[1] for g in qkv.groups] == ["q4_k", "q6_k"]  # q+k, then v
    assert model.layers[1].mlp.experts.formats == {"gate_proj": "q4_k", "up_proj": "q4_k", "down_proj": "q8_0"}
    assert model.lm_head.formats[None] == "q6_k"
    assert formats("layers.1.mlp.router.weight", None) is None


def test_bad_input():
    with pytest.raises(ValueError, match="file_type"):
        tensor_type("Q4_K", "output.weight", (10, 256), AIR)
    with pytest.raises(ValueError, match="file_type"):
        weight_formats_for("q4_k_m", AIR)
    with pytest.raises(ValueError, match="shape_values"):
        tensor_type("Q4_0", "output.weight", (10, 0), AIR)
    with pytest.raises(ValueError, match="gguf_name"):
        tensor_type("Q4_0", "", (10, 256), AIR)
