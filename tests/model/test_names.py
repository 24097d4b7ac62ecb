"""The HF <-> glmtg <-> GGUF name table covers every parameter, both ways."""

from __future__ import annotations

import torch

from glmtg.loading.names import (
    expected_hf_names,
    gguf_to_glmtg,
    glmtg_state_dict_to_hf,
    glmtg_to_gguf,
    glmtg_to_hf,
    hf_to_glmtg,
    unfuse_transformers_experts,
)
from glmtg.model import Glm4MoeForCausalLM

from .helpers import tiny


def meta_params(config):
    return list(Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta").named_parameters())


def test_round_trip_every_parameter():
    for config in (tiny(), tiny(use_qk_norm=False, first_k_dense_replace=0)):
        params = meta_params(config)
        expected = expected_hf_names(params)
        n_hf = sum(p.shape[0] if ".mlp.experts." in n else 1 for n, p in params)
        assert len(expected) == n_hf
        for hf_name, (name, expert) in expected.items():
            t = hf_to_glmtg(hf_name)
            assert (t.glmtg, t.expert) == (name, expert)
        gguf = {glmtg_to_gguf(n) for n, _ in params}
        assert len(gguf) == len(params)
        assert all(gguf_to_glmtg(glmtg_to_gguf(n)) == n for n, _ in params)
        assert any(".q_norm." in n for n, _ in params) == config.use_qk_norm


def test_known_names():
    assert glmtg_to_hf("layers.3.mlp.experts.down_proj", 2) == [
        "model.layers.3.mlp.experts.0.down_proj.weight", "model.layers.3.mlp.experts.1.down_proj.weight"]
    assert glmtg_to_gguf("layers.3.mlp.experts.down_proj") == "blk.3.ffn_down_exps.weight"
    assert glmtg_to_gguf("layers.0.mlp.router.e_score_correction_bias") == "blk.0.exp_probs_b.bias"
    assert glmtg_to_gguf("embed.weight") == "token_embd.weight" and glmtg_to_gguf("lm_head.weight") == "output.weight"
    assert hf_to_glmtg("model.layers.7.mlp.gate.weight").glmtg == "layers.7.mlp.router.weight"
    assert hf_to_glmtg("model.layers.7.mlp.shared_experts.up_proj.weight").glmtg == "layers.7.mlp.shared.up_proj.weight"
    assert hf_to_glmtg("model.layers.46.eh_proj.weight") is None
    assert hf_to_glmtg("model.rotary_emb.inv_freq") is None
    assert gguf_to_glmtg("blk.1.nextn.eh_proj.weight") is None


def test_state_dict_to_hf_and_unfuse():
    e, i, h = 3, 4, 5
    stacked = torch.arange(e * i * h, dtype=torch.float32).view(e, i, h)
    out = dict(glmtg_state_dict_to_hf({"layers.2.mlp.experts.gate_proj": stacked, "norm.weight": torch.ones(h)}))
    assert torch.equal(out["model.layers.2.mlp.experts.1.gate_proj.weight"], stacked[1])
    assert torch.equal(out["model.norm.weight"], torch.ones(h))
    fused = torch.randn(e, 2 * i, h)
    un = unfuse_transformers_experts({"model.layers.1.mlp.experts.gate_up_proj": fused,
                                      "model.layers.1.mlp.experts.down_proj": torch.randn(e, h, i)})
    assert torch.equal(un["model.layers.1.mlp.experts.2.gate_proj.weight"], fused[2, :i])
    assert torch.equal(un["model.layers.1.mlp.experts.2.up_proj.weight"], fused[2, i:])
    assert un["model.layers.1.mlp.experts.0.down_proj.weight"].shape == (h, i)
