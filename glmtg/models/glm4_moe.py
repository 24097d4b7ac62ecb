"""GLM4-MoE (GLM-4.5 / 4.6 / 4.7 / 4.5-Air), built from glmtg.layers.

Per layer: RMSNorm -> attention (fused QKV with bias, optional per-head q/k RMSNorm, partial NeoX RoPE,
o_proj) -> residual -> RMSNorm -> dense SwiGLU MLP (first ``first_k_dense_replace`` layers) or MoE (sigmoid
router with a selection-only bias, top-k routed experts + shared expert) -> residual.

Weights: the model is built (usually on the meta device) and every checkpoint tensor is written with
``load_tensor`` into its parameter: whole, as one shard of a fused projection (q/k/v, gate/up) or as one
expert of a stacked expert parameter. ``tensor_slots`` lists what a checkpoint must provide; the HF/GGUF
names of each slot are in glmtg/loading/names.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.layers.attention import BACKENDS, Attention, StepContext
from glmtg.layers.linear import DenseLinear, Linear
from glmtg.layers.mlp import MLP
from glmtg.layers.moe import Experts, MoE
from glmtg.layers.norm import RMSNorm
from glmtg.layers.params import TensorSlot, write_parameter
from glmtg.layers.rope import rope_cos_sin

if TYPE_CHECKING:
    from glmtg.kv_cache import KVCache


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, experts_backend: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (MoE(config, dtype, experts_backend) if config.is_moe_layer(layer)
                    else MLP(config.hidden_size, config.intermediate_size, dtype))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)  # [B, S, H]
        return x + self.mlp(self.mlp_norm(x))


class Glm4MoeForCausalLM(nn.Module):
    """Token ids -> logits over a KV cache. ``experts_backend`` ("auto", "kernel", "torch") picks how the MoE
    layers run few (token, expert) pairs (glmtg.layers.moe.Experts)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", experts_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        with torch.device(device):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, experts_backend)
                                        for i in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = DenseLinear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, input_ids: torch.Tensor, cache: KVCache, attn_backend: str = "sdpa",
                last_only: bool = False, validate: bool = True) -> torch.Tensor:
        """input_ids [B, S]: token s of sequence b at position cache.lengths[b] + s. Appends each layer's K/V
        to the cache but does not advance cache.lengths (the caller does). Returns fp32 logits [B, S, vocab]
        ([B, 1, vocab] with ``last_only``, which saves the lm_head over a long prefill).

        ``validate`` reads cache.lengths on the host once to check that the S new tokens fit (skipped while
        a CUDA graph is being captured); a caller that tracks the lengths on the host passes False, and the
        step then reads nothing back (the cache write skips out-of-range tokens on the device).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if attn_backend not in BACKENDS:  # before any layer writes to the cache
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {attn_backend!r}")
        s = input_ids.shape[1]
        if validate and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            _check_room(cache, s)
        positions = cache.lengths.to(torch.long)[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
        cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)  # [B, S, R]
        ctx = StepContext(cache, cache.lengths + s, cos, sin, attn_backend)
        x = self.embed(input_ids)  # [B, S, H]
        for layer in self.layers:
            x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()  # [B, S or 1, vocab]

    # ------------------------------------------------------------------ weights

    def tensor_slots(self) -> Iterator[TensorSlot]:
        """Every tensor a checkpoint provides, in parameter order (a fused projection shard by shard; a tied
        lm_head is not listed)."""
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            own = [(attr, p) for attr, p in module.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in own)
            base = f"{prefix}." if prefix else ""
            if isinstance(module, Linear):
                dtypes = dict(own)
                for attr, shard, shape in module.slots():
                    if attr in dtypes:
                        yield TensorSlot(base + attr, shard, shape, dtypes[attr].dtype)
                continue
            for attr, p in own:
                yield TensorSlot(base + attr, None, tuple(p.shape), p.dtype)

    def load_tensor(self, name: str, value: torch.Tensor, *, shard: str | None = None,
                    expert: int | None = None) -> None:
        """Write one checkpoint tensor into parameter ``name``: the whole parameter (no copy), the rows of
        ``shard`` of a fused projection, or stacked expert ``expert``. Slices of a parameter still on the
        meta device allocate it on ``value``'s device first. ``value`` must have the slot's shape and the
        parameter's dtype (ValueError otherwise)."""
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"no parameter {name!r}") from None
        if isinstance(module, Linear):
            module.load_shard(attr, shard, value)
        elif isinstance(module, Experts):
            if shard is not None:
                raise ValueError(f"{name} has no shards, got shard {shard!r}")
            module.load_expert(attr, expert, value)
        else:
            if shard is not None or expert is not None:
                raise ValueError(f"{name} is a plain parameter, got shard {shard!r} / expert {expert!r}")
            write_parameter(module, attr, value)
        if self.config.tie_word_embeddings and name == "embed.weight":
            self.lm_head.weight = self.embed.weight

    def slot_tensors(self) -> Iterator[tuple[TensorSlot, torch.Tensor]]:
        """(slot, the values it holds now): views of the parameters, no copy."""
        params = dict(self.named_parameters())
        for slot in self.tensor_slots():
            module = self.get_submodule(slot.name.rpartition(".")[0])
            value = params[slot.name]
            if isinstance(module, Linear):
                value = value[module.rows(slot.shard)]
            yield slot, value


def _check_room(cache: KVCache, s: int) -> None:
    """ValueError unless every sequence has room for ``s`` more tokens (one host read of cache.lengths)."""
    lengths = cache.lengths.cpu()
    if bool((lengths < 0).any()):
        raise ValueError(f"cache.lengths must be >= 0, got min {int(lengths.min())}")
    if bool((lengths + s > cache.capacity).any()):
        raise ValueError(f"{s} new tokens exceed the cache capacity {cache.capacity}: "
                         f"max cache.lengths {int(lengths.max())}")
