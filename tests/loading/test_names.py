"""The HF <-> glmtg <-> GGUF name table covers every tensor slot of the model, both ways."""

from __future__ import annotations

import torch

from glmtg.loading.names import (
    expected_hf_names,
    gguf_to_glmtg,
    glmtg_tensors_to_hf,
    glmtg_to_gguf,
    glmtg_to_hf,
    hf_to_glmtg,
    unfuse_transformers_experts,
)
from glmtg.loading.presets import random_model
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import tiny


def meta_slots(config):
    return list(Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta").tensor_slots())


def test_round_trip_every_slot():
    for config in (tiny(), tiny(use_qk_norm=False, first_k_dense_replace=0)):
        slots = meta_slots(config)
        expected = expected_hf_names(slots)
        n_hf = sum(s.shape[0] if ".mlp.experts." in s.name else 1 for s in slots)
        assert len(expected) == n_hf
        for hf_name, (slot, expert) in expected.items():
            t = hf_to_glmtg(hf_name)
            assert (t.glmtg, t.shard, t.expert) == (slot.name, slot.shard, expert)
        gguf = {glmtg_to_gguf(s.name, s.shard) for s in slots}
        assert len(gguf) == len(slots)
        assert all(gguf_to_glmtg(glmtg_to_gguf(s.name, s.shard)) == (s.name, s.shard) for s in slots)
        assert any(".q_norm." in s.name for s in slots) == config.use_qk_norm


def test_known_names():
    assert glmtg_to_hf("layers.3.mlp.experts.down_proj", 2) == [
        "model.layers.3.mlp.experts.0.down_proj.weight", "model.layers.3.mlp.experts.1.down_proj.weight"]
    assert glmtg_to_gguf("layers.3.mlp.experts.down_proj") == "blk.3.ffn_down_exps.weight"
    assert glmtg_to_gguf("layers.0.mlp.router.e_score_correction_bias") == "blk.0.exp_probs_b.bias"
    assert glmtg_to_gguf("embed.weight") == "token_embd.weight" and glmtg_to_gguf("lm_head.weight") == "output.weight"
    assert glmtg_to_gguf("layers.2.attn.qkv.bias", "k") == "blk.2.attn_k.bias"
    assert glmtg_to_hf("layers.2.mlp.gate_up.weight", 1, "up") == ["model.layers.2.mlp.up_proj.weight"]
    assert hf_to_glmtg("model.layers.7.mlp.gate.weight").glmtg == "layers.7.mlp.router.weight"
    t = hf_to_glmtg("model.layers.7.mlp.shared_experts.up_proj.weight")
    assert (t.glmtg, t.shard, t.expert) == ("layers.7.mlp.shared.gate_up.weight", "up", None)
    t = hf_to_glmtg("model.layers.0.self_attn.v_proj.bias")
    assert (t.glmtg, t.shard) == ("layers.0.attn.qkv.bias", "v")
    assert gguf_to_glmtg("blk.4.ffn_gate.weight") == ("layers.4.mlp.gate_up.weight", "gate")
    assert hf_to_glmtg("model.layers.46.eh_proj.weight") is None
    assert hf_to_glmtg("model.rotary_emb.inv_freq") is None
    assert gguf_to_glmtg("blk.1.nextn.eh_proj.weight") is None


def test_model_tensors_to_hf_and_unfuse():
    config = tiny()
    model = random_model(config, seed=2, dtype=torch.float32)
    out = dict(glmtg_tensors_to_hf(model.slot_tensors()))
    assert set(out) == set(expected_hf_names(model.tensor_slots()))
    params = dict(model.named_parameters())
    qkv = params["layers.0.attn.qkv.weight"]
    nq, nkv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], qkv[nq:nq + nkv])
    assert torch.equal(out["model.layers.1.mlp.experts.1.gate_proj.weight"], params["layers.1.mlp.experts.gate_proj"][1])
    assert torch.equal(out["model.layers.1.mlp.shared_experts.up_proj.weight"],
                       params["layers.1.mlp.shared.gate_up.weight"][config.moe_intermediate_size:])
    e, i, h = 3, 4, 5
    fused = torch.randn(e, 2 * i, h)
    un = unfuse_transformers_experts({"model.layers.1.mlp.experts.gate_up_proj": fused,
                                      "model.layers.1.mlp.experts.down_proj": torch.randn(e, h, i)})
    assert torch.equal(un["model.layers.1.mlp.experts.2.gate_proj.weight"], fused[2, :i])
    assert torch.equal(un["model.layers.1.mlp.experts.2.up_proj.weight"], fused[2, i:])
    assert un["model.layers.1.mlp.experts.0.down_proj.weight"].shape == (h, i)
