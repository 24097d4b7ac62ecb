"""One tensor-name table: HF checkpoint <-> glmtg parameter (and shard) <-> GGUF.

glmtg keeps each layer's routed experts stacked in one parameter ([E, I, H] gate/up, [E, H, I] down), so one
glmtg name stands for E HF tensors (``model.layers.N.mlp.experts.E.gate_proj.weight``) and for one GGUF tensor
(``blk.N.ffn_gate_exps.weight``). q/k/v and gate/up are fused into one parameter each (``attn.qkv``,
``mlp.gate_up``, ``mlp.shared.gate_up``); each of their checkpoint tensors fills one named shard of it
(``Glm4MoeForCausalLM.load_tensor``). Everything else maps one to one.

GGUF names follow llama.cpp's glm4moe tensor names (DESIGN.md §2). attn_q/attn_k rows are in the HF checkpoint's
order: llama.cpp's converter (conversion/glm.py, ``Glm4MoeModel.modify_tensors``) does not permute Q/K for glm4moe
because the model already uses NeoX RoPE ordering (verified from the converter source), so a GGUF tensor and its
HF tensor fill the same slot unchanged. Next-token-prediction (MTP) blocks, appended after the main layers, carry
the layer table's names plus the ``nextn.*`` ones in ``NEXTN_SUFFIXES``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from glmtg.layers.params import TensorSlot

# (glmtg parameter under "layers.{i}.", shard of it, HF suffix under "model.layers.{i}.", GGUF suffix under
# "blk.{i}."). `{e}` in an HF suffix marks a per-expert tensor stacked into the glmtg parameter at index e.
LAYER_TABLE: tuple[tuple[str, str | None, str, str], ...] = (
    ("attn_norm.weight", None, "input_layernorm.weight", "attn_norm.weight"),
    # q, k and v: weight and bias each, shards of the fused projection
    *((f"attn.qkv.{kind}", p, f"self_attn.{p}_proj.{kind}", f"attn_{p}.{kind}")
      for p in "qkv" for kind in ("weight", "bias")),
    ("attn.o_proj.weight", None, "self_attn.o_proj.weight", "attn_output.weight"),
    ("attn.q_norm.weight", None, "self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("attn.k_norm.weight", None, "self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp_norm.weight", None, "post_attention_layernorm.weight", "post_attention_norm.weight"),
    # dense layers (layer < first_k_dense_replace) and the MoE layers' shared expert: SwiGLU, gate/up fused
    *((f"{glmtg}.gate_up.weight", p, f"{hf}.{p}_proj.weight", f"ffn_{p}{gguf}.weight")
      for glmtg, hf, gguf in (("mlp", "mlp", ""), ("mlp.shared", "mlp.shared_experts", "_shexp"))
      for p in ("gate", "up")),
    ("mlp.down_proj.weight", None, "mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.shared.down_proj.weight", None, "mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
    # MoE layers: router and the routed experts, stacked
    ("mlp.router.weight", None, "mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.router.e_score_correction_bias", None, "mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    *((f"mlp.experts.{p}_proj", None, f"mlp.experts.{{e}}.{p}_proj.weight", f"ffn_{p}_exps.weight")
      for p in ("gate", "up", "down")),
)
GLOBAL_TABLE: tuple[tuple[str, str | None, str, str], ...] = (
    ("embed.weight", None, "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", None, "model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", None, "lm_head.weight", "output.weight"),
)

# Tensors only the MTP/nextn blocks have (llama.cpp's LLM_TENSOR_NEXTN_*), under "blk.{i}.".
NEXTN_SUFFIXES: tuple[str, ...] = tuple(f"nextn.{n}.weight" for n in (
    "eh_proj", "enorm", "hnorm", "embed_tokens", "shared_head_head", "shared_head_norm"))

_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GLMTG_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

_HF_LAYER = {hf: (g, shard) for g, shard, hf, _ in LAYER_TABLE if "{e}" not in hf}
_HF_GLOBAL = {hf: (g, shard) for g, shard, hf, _ in GLOBAL_TABLE}
_G_LAYER = {(g, shard): (hf, gguf) for g, shard, hf, gguf in LAYER_TABLE}
_G_GLOBAL = {(g, shard): (hf, gguf) for g, shard, hf, gguf in GLOBAL_TABLE}
_GGUF_LAYER_SUFFIXES = frozenset(gguf for *_, gguf in LAYER_TABLE)


@dataclass(frozen=True)
class HFTensor:
    """Where one HF checkpoint tensor goes: a glmtg parameter, one shard of a fused one, or one expert slice
    of a stacked one."""

    glmtg: str
    layer: int | None  # None for embed/norm/lm_head
    expert: int | None  # index along dim 0 of a stacked expert parameter; None: the whole parameter
    shard: str | None = None  # shard of a fused parameter (q/k/v, gate/up); None: the whole parameter


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
        g, shard = _HF_GLOBAL[hf_name]
        return HFTensor(g, None, None, shard)
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    layer, suffix = int(m.group(1)), m.group(2)
    if suffix in _HF_LAYER:
        g, shard = _HF_LAYER[suffix]
        return HFTensor(f"layers.{layer}.{g}", layer, None, shard)
    e = _EXPERT_RE.match(suffix)
    if e:
        return HFTensor(f"layers.{layer}.mlp.experts.{e.group(2)}", layer, int(e.group(1)))
    return None


def _lookup(name: str, shard: str | None, what: str) -> tuple[int | None, str, str]:
    """(layer or None, HF suffix or name, GGUF suffix or name) of a glmtg parameter (shard)."""
    if (name, shard) in _G_GLOBAL:
        return (None, *_G_GLOBAL[name, shard])
    m = _GLMTG_LAYER_RE.match(name)
    if not m or (m.group(2), shard) not in _G_LAYER:
        raise KeyError(f"no {what} name for glmtg parameter {name!r}" + (f" shard {shard!r}" if shard else ""))
    return (int(m.group(1)), *_G_LAYER[m.group(2), shard])


def glmtg_to_hf(name: str, num_experts: int, shard: str | None = None) -> list[str]:
    """HF checkpoint names holding a glmtg parameter (or one shard of a fused one): one, or ``num_experts`` for
    a stacked expert tensor (in expert order)."""
    layer, hf, _ = _lookup(name, shard, "HF")
    if layer is None:
        return [hf]
    if "{e}" in hf:
        return [f"model.layers.{layer}." + hf.format(e=e) for e in range(num_experts)]
    return [f"model.layers.{layer}.{hf}"]


def glmtg_to_gguf(name: str, shard: str | None = None) -> str:
    """GGUF tensor name of a glmtg parameter or shard (stacked experts are one GGUF tensor)."""
    layer, _, gguf = _lookup(name, shard, "GGUF")
    return gguf if layer is None else f"blk.{layer}.{gguf}"


def gguf_to_glmtg(gguf_name: str) -> tuple[str, str | None] | None:
    """Inverse of glmtg_to_gguf: (glmtg parameter, shard or None); None for names outside the table."""
    for g, shard, _, gguf in GLOBAL_TABLE:
        if gguf == gguf_name:
            return g, shard
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    if not m:
        return None
    for g, shard, _, gguf in LAYER_TABLE:
        if gguf == m.group(2):
            return f"layers.{m.group(1)}.{g}", shard
    return None


def gguf_block_index(gguf_name: str) -> int | None:
    """The block index of a GGUF name (``blk.N.``), None for global tensors."""
    m = _GGUF_BLOCK_RE.match(gguf_name)
    return int(m.group(1)) if m else None


def is_gguf_layer_name(gguf_name: str, *, nextn: bool = False) -> bool:
    """Whether ``gguf_name`` is ``blk.N.<suffix>`` with a suffix of the layer table (or, with ``nextn``, of an
    MTP block, which also has the ``nextn.*`` tensors)."""
    m = _GGUF_BLOCK_RE.match(gguf_name)
    if not m:
        return False
    return m.group(2) in _GGUF_LAYER_SUFFIXES or (nextn and m.group(2) in NEXTN_SUFFIXES)


def expected_gguf_names(slots: Iterable[TensorSlot]) -> dict[str, TensorSlot]:
    """GGUF name -> slot for every tensor a GGUF file must provide for these slots
    (``Glm4MoeForCausalLM.tensor_slots()``); a stacked expert slot is one GGUF tensor."""
    return {glmtg_to_gguf(slot.name, slot.shard): slot for slot in slots}


def _is_stacked(name: str) -> bool:
    return ".mlp.experts." in name


def glmtg_tensors_to_hf(tensors: Iterable[tuple[TensorSlot, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF checkpoint name, tensor) for (slot, value) pairs such as ``Glm4MoeForCausalLM.slot_tensors()``,
    splitting stacked experts (views, no copy)."""
    for slot, t in tensors:
        stacked = _is_stacked(slot.name)
        hf_names = glmtg_to_hf(slot.name, t.shape[0] if stacked else 1, slot.shard)
        if not stacked:
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


def expected_hf_names(slots: Iterable[TensorSlot]) -> dict[str, tuple[TensorSlot, int | None]]:
    """HF name -> (slot, expert index) for every tensor a checkpoint must provide for these slots
    (``Glm4MoeForCausalLM.tensor_slots()``); a stacked expert slot wants one tensor per expert."""
    out: dict[str, tuple[TensorSlot, int | None]] = {}
    for slot in slots:
        stacked = _is_stacked(slot.name)
        for e, hf in enumerate(glmtg_to_hf(slot.name, slot.shape[0] if stacked else 1, slot.shard)):
            out[hf] = (slot, e if stacked else None)
    return out
