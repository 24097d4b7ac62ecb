"""HF safetensors directory -> load_model -> the same logits as transformers; bad directories -> ValueError.

Weights are float32 in the files and loaded as float32, so the logits tolerance is the model test's
(summation order only); the bf16 load is checked for dtypes and for values equal to the rounded originals.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glmtg.config import ModelConfig
from glmtg.loading import load_model
from glmtg.loading.names import hf_to_glmtg
from tests.references.model import (
    hf_checkpoint_state,
    hf_logits,
    hf_reference,
    new_cache,
)

RTOL, ATOL = 1e-4, 2e-5
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=1001, num_hidden_layers=3,
                             num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def reference():
    hf = hf_reference(CONFIG, seed=4)
    state = hf_checkpoint_state(hf)
    # An MTP/nextn layer after the last decoder layer, as the GLM checkpoints have: names the table does not
    # know (eh_proj, enorm, ...) and ones it does (attention, experts) -- all must be skipped.
    nl, h = CONFIG.num_hidden_layers, CONFIG.hidden_size
    extra = {
        f"model.layers.{nl}.eh_proj.weight": torch.randn(h, 2 * h),
        f"model.layers.{nl}.enorm.weight": torch.ones(h),
        f"model.layers.{nl}.hnorm.weight": torch.ones(h),
        f"model.layers.{nl}.shared_head.norm.weight": torch.ones(h),
        f"model.layers.{nl}.embed_tokens.weight": torch.randn(CONFIG.vocab_size, h),
        f"model.layers.{nl}.self_attn.q_proj.weight": torch.randn(3, 3),  # wrong shape: proves it is skipped
        f"model.layers.{nl}.mlp.experts.0.gate_proj.weight": torch.randn(CONFIG.moe_intermediate_size, h),
    }
    ids = torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    return hf, {**state, **extra}, ids, hf_logits(hf, ids)


def write_checkpoint(root: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture
def logits_of():
    def run(model, ids):
        return model(ids, new_cache(model.config, ids.shape[0], ids.shape[1]), attn_backend="sdpa")
    return run


@pytest.mark.parametrize("shards,config_shape", [(1, "published"), (3, "transformers5")])
def test_load_gives_transformers_logits(tmp_path, reference, logits_of, shards, config_shape):
    hf, state, ids, want = reference
    # GLM repos put rope_theta/partial_rotary_factor at the top level and eos as a list; transformers 5 writes
    # them into rope_parameters. Both must load to the same model.
    config = CONFIG.to_hf_dict() if config_shape == "published" else hf.config.to_dict()
    root = write_checkpoint(tmp_path / "ckpt", state, config, shards)
    model, loaded = load_model(root, dtype=torch.float32, progress=False)
    assert loaded == CONFIG
    torch.testing.assert_close(logits_of(model, ids), want, rtol=RTOL, atol=ATOL)


def test_load_bf16_keeps_router_fp32(tmp_path, reference):
    _, state, _, _ = reference
    root = write_checkpoint(tmp_path / "ckpt", state, CONFIG.to_hf_dict())
    model, _ = load_model(root, progress=False)  # default dtype bf16
    assert model.embed.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())
    moe = model.layers[CONFIG.first_k_dense_replace].mlp
    assert moe.router.weight.dtype == torch.float32 and moe.router.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_proj.dtype == torch.bfloat16
    e3 = state[f"model.layers.{CONFIG.first_k_dense_replace}.mlp.experts.3.up_proj.weight"]
    assert torch.equal(moe.experts.up_proj[3], e3.to(torch.bfloat16))
    assert torch.equal(moe.router.weight, state[f"model.layers.{CONFIG.first_k_dense_replace}.mlp.gate.weight"])


def _drop(state, name):
    return {k: v for k, v in state.items() if k != name}


def test_bad_checkpoints_raise_value_error(tmp_path, reference):
    _, state, _, _ = reference
    good = CONFIG.to_hf_dict()
    cases: dict[str, tuple[Path, str]] = {}

    cases["no dir"] = (tmp_path / "nope", "not a directory")
    d = tmp_path / "no_config"
    d.mkdir()
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    cases["no config"] = (d, "config file not found")
    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(good))
    cases["no weights"] = (d, "no model.safetensors")
    cases["model_type"] = (write_checkpoint(tmp_path / "llama", state, {**good, "model_type": "llama"}),
                           "model_type")
    cases["missing tensor"] = (write_checkpoint(tmp_path / "missing", _drop(state, "model.layers.2.mlp.experts.5.down_proj.weight"), good),
                               "missing")
    wrong = dict(state, **{"model.norm.weight": torch.ones(CONFIG.hidden_size + 1)})
    cases["wrong shape"] = (write_checkpoint(tmp_path / "shape", wrong, good), "shape")
    cases["unexpected"] = (write_checkpoint(tmp_path / "extra", dict(state, **{"model.rotary.inv_freq": torch.ones(4)}), good),
                           "not a GLM4-MoE tensor")
    no_qk = {**good, "use_qk_norm": False}
    cases["does not fit"] = (write_checkpoint(tmp_path / "qk", state, no_qk), "does not fit")

    d = write_checkpoint(tmp_path / "corrupt", state, good, shards=2)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases["corrupt shard"] = (d, "cannot read safetensors")
    d = write_checkpoint(tmp_path / "truncated", state, good)
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cases["truncated"] = (d, "cannot read")
    d = write_checkpoint(tmp_path / "lost_shard", state, good, shards=3)
    (d / "model-00003-of-00003.safetensors").unlink()
    cases["missing shard"] = (d, "missing")
    d = write_checkpoint(tmp_path / "bad_index", state, good, shards=2)
    (d / "model.safetensors.index.json").write_text("{oops")
    cases["bad index"] = (d, "index")

    for what, (path, match) in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            load_model(path, dtype=torch.float32, progress=False)
        assert "\n" not in str(info.value), what


def test_every_tensor_name_maps(reference):
    _, state, _, _ = reference
    for name in state:
        layer_is_nextn = name.startswith(f"model.layers.{CONFIG.num_hidden_layers}.")
        assert (hf_to_glmtg(name) is not None) or layer_is_nextn, name


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int8])
def test_non_float_tensor_is_refused_by_name(tmp_path, reference, dtype):
    _, state, _, _ = reference
    bad = dict(state, **{"model.norm.weight": torch.ones(CONFIG.hidden_size, dtype=dtype)})
    root = write_checkpoint(tmp_path / "ckpt", bad, CONFIG.to_hf_dict())
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"tensor model\.norm\.weight has dtype {name}; weights must be floating"):
        load_model(root, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("value, dtype", [(float("nan"), torch.float32), (float("inf"), torch.float32),
                                          (1e6, torch.float16)])  # 1e6 overflows float16 to inf
def test_non_finite_weights_are_refused_by_name(tmp_path, reference, value, dtype):
    _, state, _, _ = reference
    name = "model.layers.1.self_attn.q_proj.weight"
    w = state[name].clone()
    w[3, 5] = value
    root = write_checkpoint(tmp_path / "ckpt", dict(state, **{name: w}), CONFIG.to_hf_dict())
    with pytest.raises(ValueError, match=rf"tensor {name} holds 1 non-finite value"):
        load_model(root, dtype=dtype, progress=False)
