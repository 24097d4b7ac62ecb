"""Glm4MoeForCausalLM with GGUF-block weights (weight_formats) against the float model holding the very
values those blocks decode to.

The reference is built by dequantizing each raw slot of the quantized model (the registry's decoder,
bit-exact with gguf) into a plain float32 model, so both compute with identical weights; they differ only in
where products are split (q/k vs v in two runs, experts looped vs grouped) and so in float32 summation
order: a few ulps per op. rtol 1e-4 / atol 2e-5 on logits ~1 (as tests/models/test_glm4_moe.py) leaves
margin for that; a wrong shard, format or expert moves logits by > 1e-2.
"""

from __future__ import annotations

import importlib.util

import gguf.quants
import numpy as np
import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.layers.linear import DenseLinear
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantEmbedding, QuantLinear
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import new_cache, tiny

HAS_KERNELS = all(importlib.util.find_spec(f"glmtg.kernels.gguf.{m}") is not None for m in ("gemv", "moe"))


def mix(name: str, shard: str | None) -> str | None:
    """q8_0 for attention, embedding and head, q4_0 for the FFNs, v and the experts' down in a second format."""
    if name.endswith(("norm.weight", "bias")) or ".router." in name:
        raise AssertionError(f"asked for a float-only parameter {name}")
    if shard == "v" or name.endswith("experts.down_proj"):
        return "q4_0" if shard == "v" else "q8_0"
    if ".mlp." in name:
        return "q4_0"
    return "q8_0"


def quantize(values: torch.Tensor, fmt: str) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    return torch.from_numpy(gguf.quants.quantize(values.double().numpy().astype(np.float32), qtype))


def fill(model: Glm4MoeForCausalLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for slot in list(model.tensor_slots()):
        if slot.name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(slot.shape, generator=gen)
        else:
            value = torch.randn(slot.shape, generator=gen) * (0.01 if "bias" in slot.name else 0.05)
        value = quantize(value, slot.format) if slot.format else value.to(slot.dtype)
        assert tuple(value.shape) == slot.raw_shape
        model.load_tensor(slot.name, value, shard=slot.shard)


def dequantized_copy(model: Glm4MoeForCausalLM) -> Glm4MoeForCausalLM:
    ref = Glm4MoeForCausalLM(model.config, dtype=torch.float32, device="meta")
    for slot, value in model.slot_tensors():
        if slot.format:
            value = REGISTRY[slot.format].dequantize_blocks(value).float()
        ref.load_tensor(slot.name, value.clone(), shard=slot.shard)
    return ref


@pytest.mark.parametrize("config", (tiny(num_hidden_layers=2), tiny(tie_word_embeddings=True, num_hidden_layers=2)),
                         ids=("untied", "tied"))
def test_logits_match_dequantized_float_model(config):
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta", experts_backend="torch",
                               weight_formats=mix)
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.layers[1].mlp.experts, QuantExperts)
    assert model.dtype == torch.float32
    fill(model, seed=3)
    slots = {(s.name, s.shard): s for s in model.tensor_slots()}
    qkv_v = slots["layers.0.attn.qkv.weight", "v"]
    assert (qkv_v.format, qkv_v.dtype, qkv_v.shape) == ("q4_0", torch.uint8, (128, 64))
    assert slots["layers.1.mlp.experts.down_proj", None].shape == (8, 64, 32)
    assert slots["layers.0.attn.qkv.bias", "q"].format is None
    assert slots["layers.1.mlp.router.weight", None].dtype == torch.float32
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed.weight and ("lm_head.weight", None) not in slots
    ref = dequantized_copy(model)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = model(ids, new_cache(config, 2, 8))
    want = ref(ids, new_cache(config, 2, 8))
    assert logits.abs().max() > 0.1  # the weights reach the logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=2e-5)
    # decode: one more token per sequence over a cache holding the prefix
    cache, ref_cache = new_cache(config, 2, 8), new_cache(config, 2, 8)
    for m, c in ((model, cache), (ref, ref_cache)):
        m(ids, c)
        c.lengths += ids.shape[1]
    nxt = torch.randint(0, config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(nxt, cache), ref(nxt, ref_cache), rtol=1e-4, atol=2e-5)


def test_no_formats_is_the_float_model_and_real_device_builds_norms():
    plain = Glm4MoeForCausalLM(tiny(), dtype=torch.float32)
    assert isinstance(plain.lm_head, DenseLinear) and all(s.format is None for s in plain.tensor_slots())
    # Only the attention quantized, built on the CPU: norms are ones as in the float model, router zeros
    model = Glm4MoeForCausalLM(tiny(), dtype=torch.float32, device="cpu",
                               weight_formats=lambda n, s: "q8_0" if ".attn." in n else None)
    assert isinstance(model.layers[0].attn.qkv, QuantLinear) and isinstance(model.layers[0].mlp.gate_up, DenseLinear)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones(64))
    assert torch.equal(model.layers[1].mlp.router.e_score_correction_bias, torch.zeros(8))
    assert model.layers[0].attn.qkv.weight.device.type == "cpu"


def test_bad_weight_formats():
    with pytest.raises(ValueError, match="weight_formats\\('layers.0.attn.qkv.weight', 'q'\\)"):
        Glm4MoeForCausalLM(tiny(), device="meta", weight_formats=lambda n, s: "q4_k" if ".attn.qkv" in n else None)
    with pytest.raises(ValueError, match="all or none"):
        Glm4MoeForCausalLM(tiny(), device="meta", weight_formats=lambda n, s: "q8_0" if s == "v" else None)
    with pytest.raises(ValueError, match="all or none"):
        Glm4MoeForCausalLM(tiny(), device="meta",
                           weight_formats=lambda n, s: "q8_0" if n.endswith("experts.up_proj") else None)
    with pytest.raises(ValueError, match="weight_formats\\('embed.weight'\\)"):
        Glm4MoeForCausalLM(tiny(), device="meta", weight_formats=lambda n, s: "Q8_0")
    model = Glm4MoeForCausalLM(tiny(), device="meta", weight_formats=mix)
    with pytest.raises(ValueError, match="expected shape \\(64, 816\\)"):  # 768 q8_0 values: 24 blocks of 34 bytes
        model.load_tensor("layers.0.attn.o_proj.weight", torch.zeros(64, 768, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected dtype torch.uint8"):
        model.load_tensor("layers.0.attn.o_proj.weight", torch.zeros(64, 816))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, from inside the Triton interpreter
@pytest.mark.skipif(not HAS_KERNELS, reason="the GGUF GEMV / MoE kernels are not on this branch yet")
@pytest.mark.parametrize("dot", ("float", "auto"))
def test_kernel_backend_decode_step(dot):
    """A decode step through the GGUF decode kernels and dequantize_rows (the embedding) in the interpreter,
    against the torch backend of the same weights. Float path: both fp32 with fp32 accumulation, summed in
    other orders (rtol 1e-4 / atol 2e-5 as above). Int8-dot path ("auto" for these formats): activations
    rounded to int8 per 32 values move the logits by up to a few % of their range."""
    # one MoE layer, a small vocabulary, one token: the interpreter runs each program in Python
    config = tiny(num_hidden_layers=1, first_k_dense_replace=0, vocab_size=96, num_attention_heads=2)
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta", experts_backend="kernel",
                               weight_formats=mix)
    fill(model, seed=5)
    for module in model.modules():
        if hasattr(module, "dot"):
            module.dot = dot
    ids = torch.randint(0, config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(2))
    got = model(ids, new_cache(config, 1, 4))
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    want = model(ids, new_cache(config, 1, 4))
    if dot == "float":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=5e-2 * float(want.abs().max()))


def test_decode_weight_bytes():
    """Counted from the stored parameters: the q8_0/q4_0 model reads about a third of the fp32 model's bytes,
    and exactly: all but unchosen experts and all but one embedding row."""
    config = tiny(num_hidden_layers=2)
    plain = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta")
    quant = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta", weight_formats=mix)
    for model in (plain, quant):
        experts = model.layers[1].mlp.experts
        stacked = sum(p.numel() * p.element_size() for p in experts.parameters())
        embed = model.embed.weight
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
        want = whole - stacked * (8 - 2) // 8 - embed.numel() * embed.element_size() * 999 // 1000
        assert model.decode_weight_bytes() == want
    assert quant.decode_weight_bytes() < 0.35 * plain.decode_weight_bytes()
