"""ModelConfig: presets, both config.json shapes, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from glmtg.config import ModelConfig

# GLM-4.5-Air's published config.json (rope at the top level, eos as a list).
AIR_PUBLISHED = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408,
    "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
    "num_hidden_layers": 46, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False,
    "vocab_size": 151552,
}


def test_presets_match_design_table():
    for name in ModelConfig.PRESETS:
        ModelConfig.preset(name)
    g45, g46, air = (ModelConfig.preset(n) for n in ("glm-4.5", "glm-4.6", "glm-4.5-air"))
    assert (g45.hidden_size, g45.num_hidden_layers, g45.n_routed_experts, g45.first_k_dense_replace) == (5120, 92, 160, 3)
    assert g45.use_qk_norm and g45.routed_scaling_factor == 2.5 and g45.moe_intermediate_size == 1536
    assert g46.max_position_embeddings == 202752 and ModelConfig.preset("GLM-4.7") == g46
    assert (air.hidden_size, air.num_hidden_layers, air.n_routed_experts, air.intermediate_size) == (4096, 46, 128, 10944)
    assert not air.use_qk_norm and air.routed_scaling_factor == 1.0
    for c in (g45, air):
        assert c.gqa_ratio == 12 and c.rotary_dim == 64 and c.head_dim == 128 and c.vocab_size == 151552
    tiny = ModelConfig.preset("tiny")
    assert tiny.gqa_ratio == 6 and tiny.first_k_dense_replace == 1 and tiny.num_hidden_layers == 4
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("glm-5")


def test_from_hf_json_published_and_transformers5_shapes(tmp_path):
    assert ModelConfig.from_hf_json(AIR_PUBLISHED) == ModelConfig.preset("glm-4.5-air")
    v5 = {k: v for k, v in AIR_PUBLISHED.items() if k not in ("rope_theta", "partial_rotary_factor")}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
              eos_token_id=151329)
    c = ModelConfig.from_hf_json(v5)
    assert c.rope_theta == 1e6 and c.partial_rotary_factor == 0.5 and c.eos_token_ids == (151329,)
    (tmp_path / "config.json").write_text(json.dumps(AIR_PUBLISHED))
    assert ModelConfig.from_hf_json(tmp_path) == ModelConfig.from_hf_json(tmp_path / "config.json")
    # round trip through our own writer
    assert ModelConfig.from_hf_json(ModelConfig.preset("glm-4.5").to_hf_dict()) == ModelConfig.preset("glm-4.5")


def test_from_hf_json_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_json({**AIR_PUBLISHED, "model_type": "glm4"})
    with pytest.raises(ValueError, match="not found"):
        ModelConfig.from_hf_json(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        ModelConfig.from_hf_json(tmp_path)
    with pytest.raises(ValueError, match="n_routed_experts"):
        ModelConfig.from_hf_json({k: v for k, v in AIR_PUBLISHED.items() if k != "n_routed_experts"})
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_json({**AIR_PUBLISHED, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("field,value", [
    ("num_key_value_heads", 7),  # 96 heads not a multiple of 7
    ("num_experts_per_tok", 129),
    ("first_k_dense_replace", 47),
    ("partial_rotary_factor", 0.0),
    ("head_dim", 127),
    ("hidden_size", 0),
    ("n_group", 3),  # 128 experts not a multiple of 3
    ("topk_group", 2),  # > n_group 1
    ("eos_token_ids", (151552,)),
    ("routed_scaling_factor", 0.0),
])
def test_validation_names_the_field(field, value):
    base = ModelConfig.preset("glm-4.5-air")
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(base, **{field: value})


def test_frozen_and_hashable():
    c = ModelConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 3
    assert hash(c) == hash(dataclasses.replace(c, eos_token_ids=[2]))


@pytest.mark.parametrize("key, value, match", [
    ("rope_theta", [10000], "rope_theta must be a finite number"),
    ("rope_theta", "1e6", "rope_theta must be a finite number"),
    ("rope_theta", float("nan"), "rope_theta must be a finite number"),
    ("eos_token_id", 2.5, "eos_token_id must be an int, a list of ints or null"),
    ("eos_token_id", "2", "eos_token_id must be an int"),
    ("eos_token_id", [2, "3"], "eos_token_ids must be ints"),
    ("eos_token_id", [True], "eos_token_ids must be ints"),
    ("rope_scaling", "yarn", "rope_scaling must be a JSON object or null"),
    ("rope_parameters", [1, 2], "rope_parameters must be a JSON object or null"),
    ("num_attention_heads", "12", "num_attention_heads must be an int"),
    ("num_attention_heads", 12.0, "num_attention_heads must be an int"),
    ("num_hidden_layers", True, "num_hidden_layers must be an int"),  # bool is not an int
    ("hidden_size", 10**40, "hidden_size must be an int in"),
    ("vocab_size", -5, "vocab_size must be an int in"),
    ("num_nextn_predict_layers", "1", "num_nextn_predict_layers must be an int"),
    ("use_qk_norm", 1, "use_qk_norm must be true or false"),
    ("attention_bias", "true", "attention_bias must be true or false"),
    ("rms_norm_eps", {"x": 1}, "rms_norm_eps must be a finite number"),
    ("routed_scaling_factor", False, "routed_scaling_factor must be a finite number"),
    ("partial_rotary_factor", [0.5], "partial_rotary_factor must be a finite number"),
])
def test_fields_of_the_wrong_json_type_are_value_errors(key, value, match):
    raw = json.loads(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    raw[key] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_json(raw)


def test_null_fields_take_their_defaults():
    raw = ModelConfig.preset("tiny").to_hf_dict()
    raw.update(rms_norm_eps=None, rope_scaling=None, rope_parameters=None, eos_token_id=None, use_qk_norm=None)
    config = ModelConfig.from_hf_json(raw)
    assert config.rms_norm_eps == 1e-5 and config.eos_token_ids == () and config.use_qk_norm is False


def test_numbers_become_floats():
    raw = dict(ModelConfig.preset("tiny").to_hf_dict(), rope_theta=10000, routed_scaling_factor=2)
    config = ModelConfig.from_hf_json(raw)
    assert type(config.rope_theta) is float and type(config.routed_scaling_factor) is float
