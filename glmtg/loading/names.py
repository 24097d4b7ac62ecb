"""One tensor-name table: HF checkpoint <-> glmtg parameter <-> GGUF.

glmtg keeps each layer's routed experts stacked in one parameter ([E, I, H] gate/up, [E, H, I] down), so one
glmtg name stands for E HF tensors (``model.layers.N.mlp.experts.E.gate_proj.weight``) and for one GGUF tensor
(``blk.N.ffn_gate_exps.weight``). Everything else maps one to one.

GGUF names follow llama.cpp's glm4moe tensor names (DESIGN.md §2); Q/K row order in llama.cpp-converted files
is not verified yet, so a GGUF loader must check it before trusting this table for attn_q/attn_k.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

# (glmtg suffix under "layers.{i}.", HF suffix under "model.layers.{i}.", GGUF suffix under "blk.{i}.")
# `{e}` in an HF suffix marks a per-expert tensor stacked into the glmtg parameter at index e.
LAYER_TABLE: tuple[tuple[str, str, str], ...] = (
    ("attn_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight", "attn_q.weight"),
    ("attn.q_proj.bias", "self_attn.q_proj.bias", "attn_q.bias"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight", "attn_k.weight"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias", "attn_k.bias"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight", "attn_v.weight"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias", "attn_v.bias"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight", "attn_output.weight"),
    ("attn.q_norm.weight", "self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("attn.k_norm.weight", "self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight", "post_attention_norm.weight"),
    # dense layers (layer < first_k_dense_replace)
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight", "ffn_down.weight"),
    # MoE layers
    ("mlp.router.weight", "mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.router.e_score_correction_bias", "mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    ("mlp.experts.gate_proj", "mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight"),
    ("mlp.experts.up_proj", "mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight"),
    ("mlp.experts.down_proj", "mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight"),
    ("mlp.shared.gate_proj.weight", "mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"),
    ("mlp.shared.up_proj.weight", "mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    ("mlp.shared.down_proj.weight", "mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
)
GLOBAL_TABLE: tuple[tuple[str, str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "lm_head.weight", "output.weight"),
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GLMTG_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

_HF_LAYER = {hf: g for g, hf, _ in LAYER_TABLE if "{e}" not in hf}
_HF_GLOBAL = {hf: g for g, hf, _ in GLOBAL_TABLE}
_G_LAYER = {g: (hf, gguf) for g, hf, gguf in LAYER_TABLE}
_G_GLOBAL = {g: (hf, gguf) for g, hf, gguf in GLOBAL_TABLE}


@dataclass(frozen=True)
class HFTensor:
    """Where one HF checkpoint tensor goes: a glmtg parameter, or one expert slice of a stacked one."""

    glmtg: str
    layer: int | None  # None for embed/norm/lm_head
    expert: int | None  # index along dim 0 of a stacked expert parameter; None: the whole parameter


def hf_layer_index(hf_name: str) -> int | None:
    """The decoder-layer index of an HF name (``model.layers.N.``), None for global tensors."""
    m = _LAYER_RE.match(hf_name)
    return int(m.group(1)) if m else None


def hf_to_glmtg(hf_name: str) -> HFTensor | None:
    """Map an HF checkpoint name; None if it is not a tensor of the base model's table.

    Layer indices are not range-checked here: MTP/nextn layers (index >= num_hidden_layers) carry names the
    table does not know (eh_proj, enorm, ...) as well as ordinary ones, and the loader skips them by index.
    """
    if hf_name in _HF_GLOBAL:
        return HFTensor(_HF_GLOBAL[hf_name], None, None)
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    layer, suffix = int(m.group(1)), m.group(2)
    if suffix in _HF_LAYER:
        return HFTensor(f"layers.{layer}.{_HF_LAYER[suffix]}", layer, None)
    e = _EXPERT_RE.match(suffix)
    if e:
        return HFTensor(f"layers.{layer}.mlp.experts.{e.group(2)}", layer, int(e.group(1)))
    return None


def glmtg_to_hf(name: str, num_experts: int) -> list[str]:
    """HF checkpoint names holding a glmtg parameter: one, or ``num_experts`` for a stacked expert tensor
    (in expert order)."""
    if name in _G_GLOBAL:
        return [_G_GLOBAL[name][0]]
    m = _GLMTG_LAYER_RE.match(name)
    if not m or m.group(2) not in _G_LAYER:
        raise KeyError(f"no HF name for glmtg parameter {name!r}")
    layer, hf = int(m.group(1)), _G_LAYER[m.group(2)][0]
    if "{e}" in hf:
        return [f"model.layers.{layer}." + hf.format(e=e) for e in range(num_experts)]
    return [f"model.layers.{layer}.{hf}"]


def glmtg_to_gguf(name: str) -> str:
    """GGUF tensor name of a glmtg parameter (stacked experts are one GGUF tensor)."""
    if name in _G_GLOBAL:
        return _G_GLOBAL[name][1]
    m = _GLMTG_LAYER_RE.match(name)
    if not m or m.group(2) not in _G_LAYER:
        raise KeyError(f"no GGUF name for glmtg parameter {name!r}")
    return f"blk.{m.group(1)}.{_G_LAYER[m.group(2)][1]}"


def gguf_to_glmtg(gguf_name: str) -> str | None:
    """Inverse of glmtg_to_gguf; None for names outside the table."""
    for g, _, gguf in GLOBAL_TABLE:
        if gguf == gguf_name:
            return g
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    if not m:
        return None
    for g, _, gguf in LAYER_TABLE:
        if gguf == m.group(2):
            return f"layers.{m.group(1)}.{g}"
    return None


def glmtg_state_dict_to_hf(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF checkpoint name, tensor) for a glmtg state dict, splitting stacked experts (views, no copy)."""
    for name, t in state.items():
        hf_names = glmtg_to_hf(name, t.shape[0] if ".mlp.experts." in name else 1)
        if len(hf_names) == 1 and ".mlp.experts." not in name:
            yield hf_names[0], t
        else:
            for e, hf in enumerate(hf_names):
                yield hf, t[e]


def unfuse_transformers_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 keeps experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H] with gate rows
    first, ``mlp.experts.down_proj`` [E, H, I]); its checkpoints and ours use one tensor per expert. Return the
    checkpoint-named dict (other entries unchanged)."""
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
    for name, t in state.items():
        m = fused.match(name)
        if not m:
            out[name] = t
            continue
        prefix = m.group(1)
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)  # [2I, H] -> 2 x [I, H]
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
    return out


def expected_hf_names(glmtg_params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[str, int | None]]:
    """HF name -> (glmtg name, expert index) for every tensor a checkpoint must provide for these parameters."""
    out: dict[str, tuple[str, int | None]] = {}
    for name, t in glmtg_params:
        stacked = ".mlp.experts." in name
        for e, hf in enumerate(glmtg_to_hf(name, t.shape[0] if stacked else 1)):
            out[hf] = (name, e if stacked else None)
    return out
