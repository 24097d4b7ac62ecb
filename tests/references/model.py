"""References for the model tests: a float32 stand-in KV cache, tiny configs, and the transformers model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from glmtg.config import ModelConfig
from glmtg.loading.names import expected_hf_names, hf_to_glmtg, unfuse_transformers_experts
from glmtg.models.glm4_moe import Glm4MoeForCausalLM


@dataclass(frozen=True)
class _View:
    data: torch.Tensor
    scale: torch.Tensor | None
    format: str


class Float32Cache:
    """glmtg.kv_cache.KVCache's interface over float32 storage, contiguous or paged.

    The real cache stores f16/bf16/quantized rows; comparing the model with transformers to ~1e-5 needs the
    K/V rows kept in float32, so the math tests use this stand-in. Its stores have no scale, which the model
    reads as plain floats in place; its format name "f32" is no kernel format, so attention uses torch. Paged
    mode hands out pages in reverse order so that a page-table bug cannot hide behind an identity mapping.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 page_size: int | None = None, device: str | torch.device = "cpu") -> None:
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.capacity = capacity
        self.appends: list[bool] = []  # the validate flag of every append, in order
        self.page_size = page_size
        if page_size is None:
            shape = (batch, num_kv_heads, capacity, head_dim)
            self.page_table = None
        else:
            per_seq = -(-capacity // page_size)
            pages = batch * per_seq
            shape = (pages, num_kv_heads, page_size, head_dim)
            self.page_table = torch.arange(pages - 1, -1, -1, dtype=torch.int32, device=device).view(batch, per_seq)
        # NaN fill: a backend reading past a sequence's length poisons the logits and fails the test.
        self._k = [torch.full(shape, float("nan"), device=device) for _ in range(num_layers)]
        self._v = [torch.full(shape, float("nan"), device=device) for _ in range(num_layers)]

    def k(self, layer: int) -> _View:
        return _View(self._k[layer], None, "f32")

    def v(self, layer: int) -> _View:
        return _View(self._v[layer], None, "f32")

    def _slot(self, b: int, pos: int) -> tuple[int, int]:
        if self.page_table is None:
            return b, pos
        return int(self.page_table[b, pos // self.page_size]), pos % self.page_size

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, start: torch.Tensor,
               *, validate: bool = True) -> None:
        self.appends.append(validate)
        bsz, s = k_new.shape[:2]
        for b in range(bsz):
            for i in range(s):
                p, t = self._slot(b, int(start[b]) + i)
                self._k[layer][p, :, t] = k_new[b, i].float()
                self._v[layer][p, :, t] = v_new[b, i].float()

    def dequantized(self, layer: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = [self._slot(b, pos) for pos in range(n)]
        k = torch.stack([self._k[layer][p, :, t] for p, t in slots], dim=1)  # [Hkv, n, D]
        v = torch.stack([self._v[layer][p, :, t] for p, t in slots], dim=1)
        return k, v


def new_cache(config: ModelConfig, batch: int, capacity: int, page_size: int | None = None,
              device: str | torch.device = "cpu") -> Float32Cache:
    return Float32Cache(config.num_hidden_layers, batch, capacity, config.num_key_value_heads, config.head_dim,
                        page_size, device)


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), **overrides)


def hf_reference(config: ModelConfig, seed: int = 0):
    """A transformers Glm4MoeForCausalLM (eager attention, float32) with every tensor random and nonzero:
    norms near 1, biases (incl. the router's selection bias) nonzero, so any mis-mapped tensor shows."""
    from transformers import Glm4MoeConfig
    from transformers import Glm4MoeForCausalLM as HFModel

    hf_config = Glm4MoeConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = HFModel(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def hf_checkpoint_state(hf_model) -> dict[str, torch.Tensor]:
    """The HF model's tensors under checkpoint names (one tensor per expert), contiguous for safetensors."""
    return {k: v.contiguous() for k, v in unfuse_transformers_experts(hf_model.state_dict()).items()}


def glmtg_from_hf(hf_model, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Glm4MoeForCausalLM:
    """Copy the transformers model's weights into a glmtg model through the name table and load_tensor."""
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta")
    dtypes = {slot.name: slot.dtype for slot in model.tensor_slots()}
    seen = set()
    for hf_name, t in hf_checkpoint_state(hf_model).items():
        target = hf_to_glmtg(hf_name)
        assert target is not None, hf_name
        value = t.to(dtypes[target.glmtg], copy=True)  # the glmtg model must not share the HF model's memory
        model.load_tensor(target.glmtg, value, shard=target.shard, expert=target.expert)
        seen.add(hf_name)
    assert seen == set(expected_hf_names(model.tensor_slots()))
    assert not any(p.is_meta for p in model.parameters())
    return model


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """Full recompute (no cache) in transformers: float32 logits [B, S, vocab]."""
    return hf_model(input_ids=ids, use_cache=False).logits.float()
