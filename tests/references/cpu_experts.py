"""float64 references for the CPU expert kernel's layer outputs (glmtg.cpu.host_experts, split_experts):
the gguf package's dequantization and the kernel's int8 roundings of the activations, reproduced."""

from __future__ import annotations

import gguf.quants
import numpy as np
import torch

from tests.references.model import tiny

WINDOW = 1e-4  # code units: an intermediate this close to a rounding boundary may round either way


def dequant_stack(stack: torch.Tensor, fmt: str) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    return gguf.quants.dequantize(stack.numpy(), qtype).astype(np.float64)


def round_x(x: np.ndarray) -> np.ndarray:
    """x rounded to int8 per 32 values by the kernel's formula, in float32 as the kernel computes it (IEEE:
    the same codes bit for bit): dx = amax / 127, codes = nearest-even of x · (127 / amax)."""
    g = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(g * inv), -127, 127)
    return (codes.astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(x.shape)


def round_a(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a rounded to int8 per 32 values in float64, and per value the step by which the kernel's fp32
    rounding may differ: a code within WINDOW of a rounding boundary may round either way (the kernel's
    fp32 g, u are off by ~1e-7 relative, ~1e-5 code units), one step dx there, 0 elsewhere."""
    g = a.reshape(*a.shape[:-1], -1, 32)
    dx = np.abs(g).max(-1, keepdims=True) / 127
    scaled = g / np.where(dx > 0, dx, 1)
    codes = np.rint(scaled)
    near = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < WINDOW
    return (codes * dx).reshape(a.shape), np.where(near, dx, 0.0).reshape(a.shape)


def host_pair(gate: np.ndarray, up: np.ndarray, down: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (token, expert) pair as the CPU kernel computes it, in float64 from the int8-rounded ``xq``:
    (down · round(silu(gate·xq) · up·xq), its error bound: 1e-5 of Σ_i |down[h, i] · a_i| (fp32 sums and
    scales) plus one int8 step of each intermediate value that sits at a rounding boundary)."""
    g, u = gate @ xq, up @ xq
    aq, step = round_a(g / (1.0 + np.exp(-g)) * u)
    return down @ aq, 1e-5 * (np.abs(down) @ np.abs(aq)) + np.abs(down) @ step


def write_random_gguf(out, config, formats, seed: int = 0) -> None:
    """A GGUF file of ``config`` with seeded random weights in ``formats`` (weight_formats): matrices std 0.08,
    norms 1 + noise, biases std 0.01 (large enough that routing and every expert matter)."""
    from glmtg.formats import quantize_blocks
    from glmtg.loading.gguf_writer import model_tensors, write_gguf
    from glmtg.models.glm4_moe import Glm4MoeForCausalLM

    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta", weight_formats=formats)
    gen = torch.Generator().manual_seed(seed)
    for slot in list(model.tensor_slots()):
        base = 1.0 if slot.name.endswith("norm.weight") else 0.0
        value = base + torch.randn(slot.shape, generator=gen) * (0.01 if "bias" in slot.name else 0.08)
        value = quantize_blocks(value, slot.format) if slot.format else value.to(slot.dtype)
        model.load_tensor(slot.name, value, shard=slot.shard)
    write_gguf(out, config, model_tensors(model))


# The host / split expert tests' model and its llama.cpp-like mix:
# 7 experts, top-3, I = 96 (three 32-blocks): odd counts, Air's 32-wide fallback formats
CONFIG = tiny(n_routed_experts=7, num_experts_per_tok=3, moe_intermediate_size=96)


def mix(name: str, shard: str | None) -> str | None:
    if name.endswith(("o_proj.weight", "lm_head.weight")):
        return None
    if name.endswith("experts.down_proj"):
        return "q8_0"
    return "q5_0" if ".mlp." in name else "q8_0"
