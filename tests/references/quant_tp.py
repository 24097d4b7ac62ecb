"""References for the quantized tensor-parallel tests: a tiny config whose inner widths split unevenly into
blocks of 32, a mix of q8_0 / q4_0 / q5_0 weight formats, and a seeded random model in those formats."""

from __future__ import annotations

import dataclasses
import re

import torch

from glmtg.config import ModelConfig
from glmtg.formats.gguf_quantize import quantize_blocks
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

# 24 query / 4 KV heads (4 ranks hold one KV head each; o_proj's 6 heads x 64 = 384 columns per rank tile
# blocks of 32). intermediate 224 = 7 blocks of 32 (4 ranks: 2,2,2,1; 2 ranks: 4,3), the shared expert's
# 96 = 3 blocks (2 ranks: 2,1; 4 ranks: 1,1,1,0 - the last rank holds a zero block): every inner width
# splits unevenly. Two layers: one dense, one MoE.
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_attention_heads=24, num_key_value_heads=4,
                             intermediate_size=224, moe_intermediate_size=96, num_hidden_layers=2)

# (pattern on the parameter name without its layer prefix, shard or "*") -> format: q, k and v in three
# formats (three storage runs in one linear), the rest spread over the three.
MIX = {
    ("attn.qkv.weight", "q"): "q8_0", ("attn.qkv.weight", "k"): "q4_0", ("attn.qkv.weight", "v"): "q5_0",
    ("attn.o_proj.weight", "*"): "q5_0", ("mlp.gate_up.weight", "*"): "q4_0", ("mlp.down_proj.weight", "*"): "q8_0",
    ("mlp.shared.gate_up.weight", "*"): "q8_0", ("mlp.shared.down_proj.weight", "*"): "q5_0",
    ("mlp.experts.gate_proj", "*"): "q4_0", ("mlp.experts.up_proj", "*"): "q4_0",
    ("mlp.experts.down_proj", "*"): "q5_0", ("embed.weight", "*"): "q8_0", ("lm_head.weight", "*"): "q8_0",
}


def mix_formats(overrides: dict[str, str] | None = None):
    """A ``weight_formats`` callable for ``MIX`` (``overrides``: key without layer prefix -> format)."""
    table = dict(MIX)
    for key, fmt in (overrides or {}).items():
        table[(key, "*")] = fmt
        for k in [k for k in table if k[0] == key and k[1] != "*"]:
            table[k] = fmt

    def formats(name: str, shard: str | None) -> str | None:
        key = re.sub(r"^layers\.\d+\.", "", name)
        return table.get((key, shard), table.get((key, "*")))

    return formats


def random_quant_model(config: ModelConfig = CONFIG, weight_formats=None, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Glm4MoeForCausalLM:
    """Seeded random weights (std 0.02 matrices, small nonzero biases and score bias, unit norms), the
    matrices quantized to ``weight_formats`` (``mix_formats()`` by default), on the CPU."""
    weight_formats = weight_formats or mix_formats()
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", weight_formats=weight_formats)
    gen = torch.Generator().manual_seed(seed)
    for slot in list(model.tensor_slots()):
        if slot.name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(slot.shape, generator=gen)
        else:
            value = 0.02 * torch.randn(slot.shape, generator=gen)
        value = value.to(slot.dtype) if slot.format is None else quantize_blocks(value, slot.format)
        model.load_tensor(slot.name, value, shard=slot.shard)
    return model.eval()
