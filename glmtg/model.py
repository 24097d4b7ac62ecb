"""GLM4-MoE (GLM-4.5 / 4.6 / 4.7 / 4.5-Air) as one readable module.

Per layer: RMSNorm -> attention (QKV with bias, optional per-head q/k RMSNorm, partial NeoX RoPE, o_proj) ->
residual -> RMSNorm -> dense SwiGLU MLP (first `first_k_dense_replace` layers) or MoE (sigmoid router with a
selection-only bias, top-k routed experts + shared expert) -> residual. Parameter names map to HF/GGUF names
through glmtg/loading/names.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.attention import BACKENDS, attend
from glmtg.config import ModelConfig
from glmtg.kernels.moe_decode import moe_decode

if TYPE_CHECKING:
    from glmtg.kv_cache import KVCache


@dataclass(frozen=True)
class StepContext:
    """What every layer of one forward needs besides its input: built once per forward."""

    cache: KVCache
    lengths_after: torch.Tensor  # int32 [B]: cached tokens per sequence once this step's are appended
    cos: torch.Tensor  # fp32 [B, S, rotary_dim], for the new tokens' positions
    sin: torch.Tensor
    backend: str


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and round back before the weight, as transformers does (bit-compatible in bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> fp32 cos, sin [B, S, rotary_dim] in NeoX layout (each frequency twice, halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]
    return emb.cos(), emb.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; rotate the first R = cos.shape[-1] dims (rotate_half over those R), pass the rest.

    Done in fp32 whatever the model dtype: positions up to 200k need the precision in the angle products.
    """
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, S, 1, R] broadcast over heads
    rot = x[..., :r].float()
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        hidden, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False, dtype=dtype)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        # (weight, bias) of q/k/v as one matrix once fuse_projections ran; set_parameter drops it again.
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse_projections(self) -> None:
        """Store q/k/v weights as one [Hq*D + 2*Hkv*D, H] matrix (the parameters become views of it), so a
        decode step reads them in one matrix-vector product instead of three launches. Idempotent."""
        if self.fused is None:
            self.fused = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        bsz, s, _ = x.shape
        if self.fused is not None:
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.fused).split((nq, nkv, nkv), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(bsz, s, self.num_heads, self.head_dim)  # [B, S, Hq*D] -> [B, S, Hq, D]
        k = k.view(bsz, s, self.num_kv_heads, self.head_dim)  # -> [B, S, Hkv, D]
        v = v.view(bsz, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_partial_rope(q, ctx.cos, ctx.sin), apply_partial_rope(k, ctx.cos, ctx.sin)
        ctx.cache.append(self.layer, k, v, start=ctx.cache.lengths)
        out = attend(q, ctx.cache, self.layer, ctx.lengths_after, ctx.backend, self.scale)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(bsz, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # gate/up, as in Attention

    def fuse_projections(self) -> None:
        """One [2I, H] matrix for gate and up (the parameters become views of it): one launch, not two.
        Idempotent."""
        if self.fused is None:
            self.fused = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input; each linear's parameters
    are replaced by views of the fused tensors, so no memory is duplicated and the names stay loadable."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears of which only some have a bias")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row:row + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + rows], requires_grad=False)
        row += rows
    return weight, bias


class Router(nn.Module):
    """Sigmoid scores; experts chosen by score + bias, weighted by the unbiased score (DeepSeek-V3 style)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Kept in fp32 whatever the model dtype (as transformers does): near-ties between experts decide the
        # choice, and bf16 logits would flip it.
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids int64 [T, k], fp32 weights [T, k])."""
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            t, e = choice.shape
            grouped = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]: sum of each group's best two
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(t, e), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


def _moe_kernel_applies(x: torch.Tensor) -> bool:
    """Whether the decode path runs the Triton kernel (glmtg/kernels/moe_decode.py): on CUDA only, so that
    a CPU run never needs the Triton interpreter. Tests patch it to run the kernel in the interpreter."""
    return x.is_cuda


class Experts(nn.Module):
    """All routed experts of a layer stacked: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(e, i, h, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=dtype))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> Σ_k weights * expert_k(x), [T, H] in x's dtype."""
        t, k = ids.shape
        if t * k <= self.gate_proj.shape[0]:
            if _moe_kernel_applies(x):
                # Reads the chosen experts' weights in place and combines in fp32 inside the kernel;
                # _gathered copies them out first (about 3x the weight bytes moved).
                return moe_decode(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights)
            y = self._gathered(x, ids)
        else:
            y = self._grouped(x, ids)
        # Combine in fp32: the weights are fp32 and the sum of k terms should round once.
        return (y.float() * weights[..., None]).sum(1).to(x.dtype)

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Few (token, expert) pairs (decode) off CUDA, and the reference for the kernel: copy out just the
        # chosen experts' weights and batch the matmuls. No host sync (graph-capturable). Returns [T, k, H].
        g = torch.einsum("th,tkih->tki", x, self.gate_proj[ids])  # [T, k, I]
        u = torch.einsum("th,tkih->tki", x, self.up_proj[ids])
        return torch.einsum("tki,tkhi->tkh", F.silu(g) * u, self.down_proj[ids])

    def _grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Many pairs (prefill): sort them by expert and run one matmul per expert that has tokens, so no
        # weight is copied and each expert's weights are read once. Needs the per-expert counts on the host.
        t, k = ids.shape
        flat = ids.reshape(-1)  # [T*k], pair p = token p // k, slot p % k
        order = torch.argsort(flat, stable=True)
        xs = x[order // k]  # [T*k, H] grouped by expert
        ys = torch.empty_like(xs)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        start = 0
        for e, c in enumerate(counts):
            if c:
                seg = xs[start:start + c]
                h = F.silu(seg @ self.gate_proj[e].T) * (seg @ self.up_proj[e].T)  # [c, I]
                ys[start:start + c] = h @ self.down_proj[e].T
                start += c
        y = torch.empty_like(ys)
        y[order] = ys
        return y.view(t, k, -1)  # [T*k, H] -> [T, k, H]


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config, dtype)
        self.shared = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype)
                       if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B, S, H] -> [T, H]
        ids, weights = self.router(flat)
        out = self.experts(flat, ids, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (MoE(config, dtype) if config.is_moe_layer(layer)
                    else MLP(config.hidden_size, config.intermediate_size, dtype))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        with torch.device(device):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
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
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, S]: token s of sequence b at position cache.lengths[b] + s. Appends each layer's K/V
        to the cache but does not advance cache.lengths (the caller does). Returns fp32 logits [B, S, vocab]
        ([B, 1, vocab] with ``last_only``, which saves the lm_head over a long prefill)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if attn_backend not in BACKENDS:  # before any layer writes to the cache
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {attn_backend!r}")
        s = input_ids.shape[1]
        positions = cache.lengths.to(torch.long)[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
        cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
        ctx = StepContext(cache, cache.lengths + s, cos, sin, attn_backend)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> Glm4MoeForCausalLM:
        """Seeded random weights: matrices std 0.02, norms 1, small nonzero biases so that the bias paths are
        exercised. Drawn on the target device (a full-size preset has tens of GB of weights, minutes of CPU
        time), so the same seed gives the same model on the same kind of device."""
        model = cls(config, dtype=dtype, device="meta")
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(shape: torch.Size) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=device)

        for name, p in list(model.named_parameters()):
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape, device=device)
            elif name.endswith(".bias"):
                value = randn(p.shape) * 0.02
            elif name.endswith("e_score_correction_bias"):
                value = randn(p.shape) * 0.01
            else:
                value = randn(p.shape) * 0.02
            model.set_parameter(name, value.to(dtype=p.dtype))
        return model

    def fuse_projections(self) -> None:
        """Fuse q/k/v and every gate/up pair into single matrices (fewer, larger matrix-vector products per
        decode step). Idempotent; a later ``set_parameter`` on one of them unfuses that module."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse_projections()

    def set_parameter(self, name: str, value: torch.Tensor) -> None:
        """Replace parameter ``name`` by ``value`` as is (no copy; loaders use it to fill a meta-device model)."""
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{name}: expected shape {tuple(old.shape)}, got {tuple(value.shape)}")
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        owner = self.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else self
        if isinstance(owner, (Attention, MLP)):
            owner.fused = None  # the fused matrix holds the old values: go back to the separate linears
        if self.config.tie_word_embeddings and name == "embed.weight":
            self.lm_head.weight = module._parameters[attr]
