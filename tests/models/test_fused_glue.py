"""The decoder's glue as fused Triton kernels (glmtg.layers.fused "on": the interpreter here) against the
torch ops ("off") on the same weights: logits and the K/V the step writes.

Both compute in fp32 with the same roundings; they differ in reduction order (the norm's mean of squares,
the router's logits) and in fused multiply-adds, a few fp32 ulps per op. After a layer of that, logits ~1
agree to ~1e-6; rtol 1e-4 / atol 1e-5 leaves margin, while a wrong head, shard, residual or expert moves
them by > 1e-2. The GGUF model's int8 path rounds activations to int8 per 32 values: a 1-ulp difference in
a normed value can flip one code (a step of amax/127, ~1 % of one value), so there the bound is 1 % of the
logits' range, still far below what a wiring error gives (the two paths' logits would be unrelated).
"""

from __future__ import annotations

import pytest
import torch

from glmtg.layers import fused
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import new_cache, tiny


def _random_fill(model: Glm4MoeForCausalLM, seed: int) -> None:
    from glmtg.formats.gguf_quantize import quantize_blocks

    gen = torch.Generator().manual_seed(seed)
    for slot in list(model.tensor_slots()):
        if slot.name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(slot.shape, generator=gen)
        elif slot.name.endswith("e_score_correction_bias"):
            value = 0.1 * torch.randn(slot.shape, generator=gen)
        else:
            value = torch.randn(slot.shape, generator=gen) * (0.05 if "bias" not in slot.name else 0.01)
        value = quantize_blocks(value, slot.format) if slot.format else value.to(slot.dtype)
        model.load_tensor(slot.name, value, shard=slot.shard)


def _run(model: Glm4MoeForCausalLM, ids: torch.Tensor, mode: str, prefix: int):
    cache = new_cache(model.config, ids.shape[0], 8)
    gen = torch.Generator().manual_seed(11)
    for layer in range(model.config.num_hidden_layers):  # earlier tokens' K/V: random, not zeros
        k = torch.randn(ids.shape[0], prefix, model.config.num_key_value_heads, model.config.head_dim, generator=gen)
        cache.append(layer, k, torch.randn(k.shape, generator=gen), start=cache.lengths)
    cache.lengths.fill_(prefix)
    with fused.mode(mode):
        logits = model(ids, cache, attn_backend="sdpa")
    return logits, [cache.k(i).data.clone() for i in range(model.config.num_hidden_layers)]


@pytest.mark.parametrize("tokens", [1, 3])
def test_float_model_glue(tokens):
    config = tiny(num_hidden_layers=2, vocab_size=96)  # a dense layer, then MoE; q/k norm, bias, partial RoPE
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta")
    model = model.to_empty(device="cpu")
    _random_fill(model, seed=3)
    ids = torch.randint(0, config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(4))
    got, got_k = _run(model, ids, "on", prefix=3)
    want, want_k = _run(model, ids, "off", prefix=3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_k, want_k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_gguf_model_glue():
    """Q8_0 attention, Q4_0 FFNs, int8-dot decode kernels: the norms round their output to int8 blocks in the
    same launch, the dense MLP's SwiGLU feeds its down product as int8 blocks, and the shared expert runs
    inside the routed experts' kernels (its terms summed in fp32 with theirs, rounded once)."""
    def mix(name: str, shard: str | None) -> str:
        return "q4_0" if ".mlp." in name else "q8_0"

    config = tiny(num_hidden_layers=2, vocab_size=96, num_attention_heads=2)
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="cpu", experts_backend="kernel",
                               weight_formats=mix)
    for module in model.modules():
        if hasattr(module, "backend") and module.backend == "auto":
            module.backend = "kernel"
    _random_fill(model, seed=5)
    assert model.layers[1].mlp_norm.quantize_output and model.layers[0].attn_norm.quantize_output
    moe = model.layers[1].mlp
    x = torch.randn(1, config.hidden_size)
    with fused.mode("on"):  # "on": the shared expert runs as one more slot of the routed experts' kernels
        assert moe.experts.shared_blocks(x, moe.shared) is not None
    with fused.mode("off"):
        assert moe.experts.shared_blocks(x, moe.shared) is None
    ids = torch.randint(0, config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(6))
    got, _ = _run(model, ids, "on", prefix=2)
    want, _ = _run(model, ids, "off", prefix=2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_mode_checked():
    with pytest.raises(ValueError, match="fused glue mode"):
        fused.set_mode("sometimes")
    assert fused.fuses(torch.zeros(1)) is False  # "auto" on a CPU tensor
