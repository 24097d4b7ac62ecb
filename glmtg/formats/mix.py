"""llama.cpp's quantization mixes for GLM4-MoE: which block format ``llama-quantize`` gives each tensor.

A llama.cpp "file type" (``Q4_K_M``, ``IQ4_XS``, ...) names a default type and a set of per-tensor
exceptions: the output head in Q6_K, some layers' attn_v and ffn_down with more bits (the _M mixes), the
token embedding of the IQ1/IQ2 mixes in Q2_K, ... and a fallback to a 32-value block type for rows whose
width is not a multiple of 256 (GLM-4.5-Air's 1408- and 10944-wide down projections: Q4_K -> Q5_0). Random
quantized models and the GGUF writer must reproduce those choices to measure what llama.cpp users run.

These are the rules of llama.cpp's src/llama-quant.cpp (llama_ftype_get_default_type,
llama_tensor_get_type_impl, tensor_type_fallback) as they apply to GLM4-MoE, for a quantization without an
importance matrix (random weights have none) and without user overrides. GLM4-MoE facts that select
branches: many experts (never the 8-expert rules), GQA ratio n_head / n_head_kv >= 4, untied output,
separate attn_q/attn_k/attn_v. llama-quantize visits tensors sorted by layer, then by name; its per-kind
counters (the i-th attn_v, the i-th ffn_down) follow that order, and its layer count includes the
next-token-prediction blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from glmtg.config import ModelConfig
from glmtg.formats.registry import REGISTRY
from glmtg.loading.names import glmtg_to_gguf

FILE_TYPES: tuple[str, ...] = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
    "IQ1_S", "IQ1_M", "BF16", "F16",
)
# The type of every quantized tensor before the per-tensor rules (note IQ2_S's is iq2_xs, as in llama.cpp).
DEFAULT_TYPE: dict[str, str] = {
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
    "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k", "Q4_K_M": "q4_k",
    "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
    "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_xs", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s",
    "IQ1_S": "iq1_s", "IQ1_M": "iq1_m", "BF16": "bf16", "F16": "f16",
}
# Where a type's 256-value blocks do not tile a row: the 32-value type llama.cpp takes instead.
FALLBACK: dict[str, str] = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}
# What tensors llama-quantize leaves alone hold: llama.cpp's converter writes norms, biases and the router
# (ffn_gate_inp) in F32.
UNQUANTIZED = "f32"
# The very-low-bit mixes that share one branch of rules.
_LOW_BIT = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ1_M")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _block(fmt: str) -> int:
    return REGISTRY[fmt].block_size


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    """The kind of a tensor, by the same substring tests in the same order as llama.cpp."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _quantizable(name: str, ndim: int) -> bool:
    """Whether llama-quantize changes this tensor's type at all (2D/3D weights, not norms, not the router)."""
    return (ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _ffn_down_index(layer: int, name: str, config: ModelConfig) -> int:
    """Position of this ffn_down tensor among all ffn_down tensors in llama-quantize's order (by layer, then
    name: a dense layer's ffn_down; a MoE layer's ffn_down_exps before ffn_down_shexp)."""
    per_moe_layer = 1 + (config.n_shared_experts > 0)
    before = sum(1 if layer_i < config.first_k_dense_replace else per_moe_layer for layer_i in range(layer))
    return before + ("ffn_down_shexp" in name)


def _rules(ft: str, new: str, name: str, cat: str, ncols: int, layer: int, config: ModelConfig) -> str:
    """llama_tensor_get_type_impl's choice for ``name`` (GLM4-MoE, no importance matrix)."""
    n_layer = config.num_hidden_layers + config.num_nextn_predict_layers  # the file's block count
    n_gqa = config.num_attention_heads // config.num_key_value_heads
    n_expert = max(1, config.n_routed_experts)
    if cat == "output" or (config.tie_word_embeddings and cat == "token_embd"):
        if ncols % _block(new):
            return "q8_0"
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ1_M"):
            return "q5_k"
        return new if new == "q8_0" else "q6_k"
    if cat == "token_embd":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "q2_k"
        if ft in ("IQ2_S", "IQ3_XXS"):
            return "iq3_s"
        return new
    if ft in _LOW_BIT:
        if cat == "attn_v":
            if n_gqa >= 4 or n_expert >= 4:
                return "q4_k"
            return "iq3_s" if ft == "IQ2_S" else "q2_k"
        if n_expert == 8 and cat == "attn_k":
            return "q4_k"
        if cat == "ffn_down":
            # this branch counts ffn_down tensors (exps and shexp apart), not layers
            if _ffn_down_index(layer, name, config) < n_layer // 8:
                return "iq3_s" if ft == "IQ2_S" else "q2_k"
            return new
        if cat == "attn_output":
            if n_expert == 8:
                return "q5_k"
            if ft in ("IQ1_S", "IQ1_M"):
                return "iq2_xxs"
            if ft == "IQ2_S":
                return "iq3_s"
        return new
    if cat == "attn_v":
        i = layer  # one attn_v per block, visited in layer order: the i-th attn_v is block i's
        if ft == "Q2_K":
            new = "q4_k" if n_gqa >= 4 else "q3_k"
        elif ft == "IQ3_XXS":
            new = "q4_k" if n_gqa >= 4 else "iq3_s"
        elif ft == "IQ3_S" and n_gqa >= 4:
            new = "q4_k"
        elif ft == "Q3_K_M":
            new = "q5_k" if i < 2 else "q4_k"
        elif ft == "Q3_K_L":
            new = "q5_k"
        elif ft in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new = "q5_k"
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n_layer):
            new = "q6_k"
        elif ft == "Q4_K_S" and i < 4:
            new = "q5_k"
        return "q8_0" if n_expert == 8 else new
    if cat == "attn_k":
        if n_expert == 8:
            return "q8_0"
        return "iq2_s" if ft == "IQ3_XXS" else new
    if cat == "attn_q":
        return "iq2_s" if ft == "IQ3_XXS" else new
    if cat == "ffn_down":
        if ft == "Q2_K":
            return "q3_k"
        if ft == "IQ3_XXS":
            return "q4_k" if layer < n_layer // 8 else "q3_k"
        if ft == "Q3_K_M":
            return "q5_k" if layer < n_layer // 16 else "q4_k"
        if ft == "Q3_K_L":
            return "q5_k"
        if ft == "Q4_K_M":
            return "q6_k" if _use_more_bits(layer, n_layer) else new
        if layer < n_layer // 8 and ft in ("IQ4_NL", "IQ4_XS"):
            return "q5_k"
        if ft == "Q5_K_M" and _use_more_bits(layer, n_layer):
            return "q6_k"
        if ft == "Q4_K_S" and layer < n_layer // 8:
            return "q5_k"
        return new
    if cat == "attn_output" and n_expert != 8:
        return {"Q2_K": "q3_k", "IQ3_XXS": "iq3_s", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(ft, new)
    if cat == "attn_output" and ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                                       "IQ4_XS"):
        return "q5_k"
    return new


def _fallback(fmt: str, ncols: int) -> str:
    """tensor_type_fallback: a type whose blocks tile rows of ``ncols``, F16 if even its fallback does not."""
    if ncols % _block(fmt) == 0:
        return fmt
    out = FALLBACK.get(fmt, fmt)
    return out if ncols % _block(out) == 0 else "f16"


def tensor_type(file_type: str, gguf_name: str, shape_values: tuple[int, ...], config: ModelConfig) -> str:
    """The glmtg format name llama-quantize gives GGUF tensor ``gguf_name`` of a GLM4-MoE model in
    ``file_type``. ``shape_values``: the tensor's shape in values, row width last ([rows, in] or
    [experts, rows, in]). Tensors llama-quantize does not touch (norms, biases, the router) are "f32"."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}")
    if not isinstance(gguf_name, str) or not gguf_name:
        raise ValueError(f"gguf_name must be a tensor name, got {gguf_name!r}")
    shape = tuple(shape_values)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"shape_values must be positive ints, got {shape_values!r}")
    if not _quantizable(gguf_name, len(shape)):
        return UNQUANTIZED
    default = DEFAULT_TYPE[file_type]
    if REGISTRY[default].block_size == 1:
        return default  # F16/BF16 files: every quantizable tensor in that type, no rules, no fallback
    m = _LAYER_RE.match(gguf_name)
    layer = int(m.group(1)) if m else -1
    cat = _category(gguf_name)
    ncols = shape[-1]
    return _fallback(_rules(file_type, default, gguf_name, cat, ncols, layer, config), ncols)


def logical_shape(name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """The shape in values of a glmtg weight matrix (one shard of a fused one; a whole expert stack), or None
    for a parameter that is not a weight matrix (norms, router, biases)."""
    h, d = config.hidden_size, config.head_dim
    shared = config.moe_intermediate_size * config.n_shared_experts
    e, i = config.n_routed_experts, config.moe_intermediate_size
    shapes = {
        "embed.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
        "attn.qkv.weight:q": (config.num_attention_heads * d, h),
        "attn.qkv.weight:k": (config.num_key_value_heads * d, h),
        "attn.qkv.weight:v": (config.num_key_value_heads * d, h),
        "attn.o_proj.weight": (h, config.num_attention_heads * d),
        "mlp.gate_up.weight": (config.intermediate_size, h), "mlp.down_proj.weight": (h, config.intermediate_size),
        "mlp.shared.gate_up.weight": (shared, h), "mlp.shared.down_proj.weight": (h, shared),
        "mlp.experts.gate_proj": (e, i, h), "mlp.experts.up_proj": (e, i, h), "mlp.experts.down_proj": (e, h, i),
    }
    return shapes.get(re.sub(r"^layers\.\d+\.", "", name))


def weight_formats_for(file_type: str, config: ModelConfig) -> Callable[[str, str | None], str | None]:
    """``Glm4MoeForCausalLM``'s ``weight_formats`` for a model as llama-quantize writes it in ``file_type``:
    (glmtg parameter, shard) -> the format of its GGUF tensor; None for norms, router and biases (float)."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}")

    def formats(name: str, shard: str | None) -> str | None:
        key = re.sub(r"^layers\.\d+\.", "", name)
        shape = logical_shape(name, config) if key != "attn.qkv.weight" else \
            logical_shape(f"{name}:{shard}", config)
        if shape is None:
            return None
        return tensor_type(file_type, glmtg_to_gguf(name, shard), shape, config)

    return formats
