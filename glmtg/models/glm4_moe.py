"""GLM4-MoE (GLM-4.5 / 4.6 / 4.7 / 4.5-Air), built from glmtg.layers.

Per layer: RMSNorm -> attention (fused QKV with bias, optional per-head q/k RMSNorm, partial NeoX RoPE,
o_proj) -> residual -> RMSNorm -> dense SwiGLU MLP (first ``first_k_dense_replace`` layers) or MoE (sigmoid
router with a selection-only bias, top-k routed experts + shared expert) -> residual.

Weights: the model is built (usually on the meta device) and every checkpoint tensor is written with
``load_tensor`` into its parameter: whole, as one shard of a fused projection (q/k/v, gate/up) or as one
expert of a stacked expert parameter. ``tensor_slots`` lists what a checkpoint must provide; the HF/GGUF
names of each slot are in glmtg/loading/names.py.

Quantized weights (``weight_formats``): the projections, the routed experts, the embedding and the lm_head
that it gives a GGUF block format are kept as the file's raw blocks (QuantLinear, QuantExperts,
QuantEmbedding); their slots carry the format and take raw uint8 rows. Norms, the router and biases stay float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.cpu.host_experts import HostArena, HostExperts
from glmtg.cpu.split_experts import SplitExperts
from glmtg.layers.attention import BACKENDS, MAX_DECODE_TOKENS, Attention, StepContext
from glmtg.layers.linear import DenseLinear, Linear
from glmtg.layers.mlp import MLP
from glmtg.layers.moe import Experts, MoE, Router
from glmtg.layers.norm import RMSNorm
from glmtg.layers.params import TensorSlot, write_parameter
from glmtg.layers.quant_experts import PARAMS as EXPERT_PARAMS
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantEmbedding, QuantLinear, check_format
from glmtg.layers.rope import rope_cos_sin, rope_cos_sin_lookup

if TYPE_CHECKING:
    from glmtg.cpu.placement import HostPlacement
    from glmtg.kv_cache import KVCache

# (glmtg parameter name, shard or None) -> GGUF block format (a glmtg.formats name) or None for a float parameter
WeightFormats = Callable[[str, "str | None"], "str | None"]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, experts_backend: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (MoE(config, dtype, experts_backend) if config.is_moe_layer(layer)
                    else MLP(config.hidden_size, config.intermediate_size, dtype))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the previous block's output, the stream before it) -> (this layer's MLP output, the stream before
        it). The residual adds are folded into the norms (one kernel each); the stream is h + residual.
        ``residual`` None: ``h`` is the stream itself (the first layer)."""
        if residual is None:
            residual, h = h, self.attn_norm(h)
        else:
            h, residual = self.attn_norm(h, residual)
        h, residual = self.mlp_norm(self.attn(h, ctx), residual)  # [B, S, H]
        return self.mlp(h), residual


class Glm4MoeForCausalLM(nn.Module):
    """Token ids -> logits over a KV cache. ``experts_backend`` ("auto", "kernel", "torch") picks how the MoE
    layers run few (token, expert) pairs (glmtg.layers.moe.Experts) and, for quantized weights, whether the
    Triton GEMV/dequantize kernels run (glmtg.layers.quant_linear).

    ``weight_formats(name, shard)`` gives the GGUF block format of each weight matrix (None: float in
    ``dtype``): embed.weight, lm_head.weight, and per layer attn.qkv.weight (shards q/k/v), attn.o_proj.weight,
    mlp.gate_up.weight (gate/up), mlp.down_proj.weight, the shared expert's mlp.shared.*, and
    mlp.experts.{gate,up,down}_proj. None (the default) builds the all-float model.

    ``host_experts`` (glmtg.cpu.placement.HostPlacement): the MoE layers whose routed experts stay in host
    memory in their GGUF blocks (one arena for the model) and run on the CPU expert kernel
    (glmtg.cpu.host_experts.HostExperts); needs ``weight_formats``. None or empty: every weight on ``device``.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", experts_backend: str = "auto",
                 weight_formats: WeightFormats | None = None, host_experts: HostPlacement | None = None) -> None:
        super().__init__()
        self.config = config
        if host_experts and weight_formats is None:
            raise ValueError("host_experts needs GGUF block weights (weight_formats): the CPU expert kernel "
                             "reads GGUF blocks, not float weights")
        # With formats, the float layout is built on the meta device first (no memory) and the quantized
        # modules replace its matrices before anything is allocated: never a float copy of the weights.
        build_on = device if weight_formats is None else "meta"
        with torch.device(build_on):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, experts_backend)
                                        for i in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
            self.lm_head = DenseLinear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if weight_formats is not None:
            _quantize_modules(self, weight_formats, dtype, torch.device(device), experts_backend, host_experts)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and float parameters') dtype; the final norm is float in every layout."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

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
            check_room(cache, s)
        positions = cache.lengths.to(torch.long)[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
        if s <= MAX_DECODE_TOKENS:  # decode: gathered from a table (positions < capacity: checked above)
            cos, sin = rope_cos_sin_lookup(positions, self.config.rotary_dim, self.config.rope_theta, cache.capacity)
        else:
            cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)  # [B, S, R]
        ctx = StepContext(cache, cache.lengths + s, cos, sin, attn_backend)
        h, residual = self.embed(input_ids), None  # [B, S, H]
        for layer in self.layers:
            h, residual = layer(h, residual, ctx)
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:]
        return self.lm_head(self.norm(h, residual)[0]).float()  # [B, S or 1, vocab]

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode token reads, as the parameters are stored: ``decode_weight_bytes_of``."""
        return decode_weight_bytes_of(self, self.config)

    # ------------------------------------------------------------------ weights

    def tensor_slots(self) -> Iterator[TensorSlot]:
        """Every tensor a checkpoint provides, in parameter order (a fused projection shard by shard; a tied
        lm_head is not listed)."""
        return tensor_slots_of(self)

    def load_tensor(self, name: str, value: torch.Tensor, *, shard: str | None = None,
                    expert: int | None = None) -> None:
        """Write one checkpoint tensor into parameter ``name``: the whole parameter (no copy), the rows of
        ``shard`` of a fused projection, or stacked expert ``expert``. Slices of a parameter still on the
        meta device allocate it on ``value``'s device first. ``value`` must have the slot's shape and the
        parameter's dtype (ValueError otherwise)."""
        write_slot(self, name, value, shard=shard, expert=expert)
        if self.config.tie_word_embeddings and name == "embed.weight":
            self.lm_head.weight = self.embed.weight

    def slot_tensors(self) -> Iterator[tuple[TensorSlot, torch.Tensor]]:
        """(slot, the values it holds now): views of the parameters, no copy; the raw blocks (uint8
        [..., row_bytes]) of a quantized slot."""
        params = dict(self.named_parameters())
        for slot in self.tensor_slots():
            module_name, _, attr = slot.name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, QuantLinear) and attr == "weight":
                yield slot, module.raw_shard(slot.shard)
                continue
            if isinstance(module, SplitExperts):
                yield slot, module.stack(attr)
                continue
            value = params[slot.name]
            if isinstance(module, Linear):
                value = value[module.rows(slot.shard)]
            yield slot, value


def decode_weight_bytes_of(model: nn.Module, config: ModelConfig) -> int:
    """Weight bytes one decode token reads from ``model`` (the whole model, or one rank's part of it), as the
    parameters are stored (quantized blocks included): everything but the routed experts a token does not
    choose and all but one row of an embedding table that is not also the head. A module holding ``count``
    of a layer's E experts reads k·count/E of them per token on average (k for the whole model; a
    tensor-parallel rank its share). For rooflines; a tied lm_head is counted once, as the full head it is."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    k = config.num_experts_per_tok
    for module in model.modules():
        if isinstance(module, (Experts, QuantExperts)):
            stacked = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            placement = module.placement
            total -= stacked - stacked * k // placement.num_experts
    embed = getattr(model, "embed", None)
    if embed is not None and not (config.tie_word_embeddings and getattr(model, "lm_head", None) is not None):
        table = embed.weight
        total -= table.numel() * table.element_size() - table[0].numel() * table.element_size()
    return total


def tensor_slots_of(root: nn.Module) -> Iterator[TensorSlot]:
    """The slots of every parameter under ``root`` (``Glm4MoeForCausalLM.tensor_slots``): also a part of the
    model whose modules keep the whole model's names (a layer-split stage, glmtg/parallel/layer_split.py)."""
    seen: set[int] = set()
    for prefix, module in root.named_modules():
        own = [(attr, p) for attr, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        base = f"{prefix}." if prefix else ""
        if isinstance(module, SplitExperts):  # the file's whole stacks; its parts list none of their own
            seen.update(id(p) for p in module.parameters())
            yield from module.slots(base)
            continue
        if isinstance(module, (QuantLinear, QuantEmbedding, QuantExperts)):
            yield from _quant_slots(module, base, {attr for attr, _ in own})
            continue
        if isinstance(module, Linear):
            dtypes = dict(own)
            for attr, shard, shape in module.slots():
                if attr in dtypes:
                    yield TensorSlot(base + attr, shard, shape, dtypes[attr].dtype)
            continue
        for attr, p in own:
            # stacked experts: the checkpoint's shape (a width-split rank holds part of each expert)
            shape = module.slot_shape(attr) if isinstance(module, Experts) else tuple(p.shape)
            yield TensorSlot(base + attr, None, shape, p.dtype)


def _quant_slots(module: nn.Module, base: str, own: set[str]) -> Iterator[TensorSlot]:
    """The slots of a quantized module: logical shapes, uint8 with the format for blocks, float biases."""
    if isinstance(module, QuantEmbedding):
        if "weight" in own:
            yield TensorSlot(base + "weight", None, (module.num_embeddings, module.embedding_dim), torch.uint8,
                             module.format)
    elif isinstance(module, QuantExperts):
        for attr in EXPERT_PARAMS:
            if attr in own:
                yield TensorSlot(base + attr, None, module.slot_shape(attr), torch.uint8, module.formats[attr])
    else:
        for attr, shard, shape in module.slots():
            fmt = module.slot_format(attr, shard)
            if fmt is None:
                if attr in own:
                    yield TensorSlot(base + attr, shard, shape, module.bias.dtype)
            elif module.storage(shard)[0] in own:  # not a tied lm_head
                yield TensorSlot(base + attr, shard, shape, torch.uint8, fmt)


def _quantize_modules(model: Glm4MoeForCausalLM, weight_formats: WeightFormats, dtype: torch.dtype,
                      device: torch.device, backend: str, host: HostPlacement | None = None) -> None:
    """Replace each matrix ``weight_formats`` gives a format with its quantized module on ``device`` (the
    model was built on meta), the routed experts of ``host``'s layers with HostExperts in one host arena,
    then put every parameter still on meta on ``device`` (norms as ones, the router as zeros, float matrices
    uninitialised: as the all-float model is built)."""
    def formats_of(name: str, shards: tuple[str | None, ...], width: int) -> dict[str | None, str] | None:
        got = {}
        for shard in shards:
            fmt = weight_formats(name, shard)
            what = f"weight_formats({name!r}" + (f", {shard!r})" if shard is not None else ")")
            got[shard] = None if fmt is None else check_format(fmt, width, what)
        if all(f is None for f in got.values()):
            return None
        if any(f is None for f in got.values()):
            raise ValueError(f"weight_formats must give all or none of {name}'s shards {list(shards)} a "
                             f"format, got {got}")
        return got

    tied = model.config.tie_word_embeddings
    host_layers = set(host.layers) if host else set()
    moe_layers = {i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)}
    if host_layers - moe_layers:
        raise ValueError(f"host_experts: layer {min(host_layers - moe_layers)} has no routed experts (the MoE "
                         f"layers are {min(moe_layers, default=0)}..{max(moe_layers, default=-1)})")
    # Pinned where CUDA is: a later slice copies from it asynchronously (on a CPU-only machine nothing to pin).
    arena = HostArena(pin=torch.cuda.is_available()) if host_layers else None
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        new: nn.Module | None = None
        with torch.device(device):
            if isinstance(module, Linear) and not (tied and name == "lm_head"):
                shards = tuple(s for s, _ in module.shards)
                fmts = formats_of(f"{name}.weight", shards, module.in_features)
                if fmts is not None:
                    out = module.out_features if shards == (None,) else module.shards
                    new = QuantLinear(module.in_features, out, bias=module.has_bias, formats=fmts, dtype=dtype,
                                      backend=backend)
            elif isinstance(module, nn.Embedding):
                fmt = formats_of(f"{name}.weight", (None,), module.embedding_dim)
                if fmt is not None:
                    new = QuantEmbedding(module.num_embeddings, module.embedding_dim, format=fmt[None],
                                         dtype=dtype, backend=backend)
            elif isinstance(module, Experts):
                layer = int(name.split(".")[1])  # "layers.{i}.mlp.experts"
                widths = {"gate_proj": module.gate_proj.shape[2], "up_proj": module.up_proj.shape[2],
                          "down_proj": module.down_proj.shape[2]}
                fmts = {p: formats_of(f"{name}.{p}", (None,), widths[p]) for p in EXPERT_PARAMS}
                if any(f is not None for f in fmts.values()):
                    if any(f is None for f in fmts.values()):
                        raise ValueError(f"weight_formats must give all or none of {name}'s {EXPERT_PARAMS} "
                                         f"a format")
                    fmt = {p: f[None] for p, f in fmts.items()}
                    if layer in host_layers and host.device_ids(layer):  # --gpu-experts: split
                        new = SplitExperts(model.config, dtype, fmt, arena, layer, host.device_ids(layer),
                                           backend=module.backend)
                    elif layer in host_layers:
                        new = HostExperts(model.config, dtype, fmt, arena, layer, placement=module.placement)
                    else:
                        new = QuantExperts(model.config, dtype, fmt, placement=module.placement,
                                           backend=module.backend)
                elif layer in host_layers:
                    raise ValueError(f"host_experts: layer {layer}'s routed experts are float; the CPU expert "
                                     f"kernel reads GGUF blocks")
        if new is not None:
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for layer in model.layers:
        _mark_int8_readers(layer)
    if tied and isinstance(model.embed, QuantEmbedding):
        # A tied head reads the embedding's blocks: same format, same parameter (tied after this call).
        with torch.device("meta"):
            model.lm_head = QuantLinear(model.config.hidden_size, model.config.vocab_size, bias=False,
                                        formats=model.embed.format, dtype=dtype, backend=backend)
    if device.type == "meta":
        return  # the arena is allocated when the first host-placed stack is written
    if arena is not None:
        arena.allocate()
    for module in model.modules():
        if tied and module is model.lm_head:
            continue  # takes the embedding's parameter once this returns
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
                elif isinstance(module, Router):
                    module.weight.zero_()
                    module.e_score_correction_bias.zero_()


def _mark_int8_readers(layer: DecoderLayer) -> None:
    """Tell each norm whether the products after it read int8 activations, so that its fused kernel rounds
    them in the same launch (RMSNorm.quantize_output)."""
    def int8(module: nn.Module | None) -> bool:
        if isinstance(module, QuantLinear):
            return module.reads_int8()
        if isinstance(module, (QuantExperts, SplitExperts)):
            return module.reads_int8()
        return False

    layer.attn_norm.quantize_output = int8(layer.attn.qkv)
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        layer.mlp_norm.quantize_output = int8(mlp.experts) or (mlp.shared is not None and int8(mlp.shared.gate_up))
    else:
        layer.mlp_norm.quantize_output = int8(mlp.gate_up)


def write_slot(root: nn.Module, name: str, value: torch.Tensor, *, shard: str | None = None,
               expert: int | None = None) -> None:
    """Write checkpoint tensor ``value`` into parameter ``name`` of ``root``, through the module that owns it:
    a Linear's shard, an expert of a stacked expert parameter, or a plain parameter (ValueError otherwise).
    The one copy of this dispatch for the whole model and a rank's part of it (glmtg/parallel)."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"no parameter {name!r}") from None
    if isinstance(module, Linear):
        module.load_shard(attr, shard, value)
    elif isinstance(module, (Experts, QuantExperts, SplitExperts)):
        if shard is not None:
            raise ValueError(f"{name} has no shards, got shard {shard!r}")
        module.load_expert(attr, expert, value)
    else:
        if shard is not None or expert is not None:
            raise ValueError(f"{name} is a plain parameter, got shard {shard!r} / expert {expert!r}")
        write_parameter(module, attr, value)


def check_room(cache: KVCache, s: int) -> None:
    """ValueError unless every sequence has room for ``s`` more tokens (one host read of cache.lengths)."""
    lengths = cache.lengths.cpu()
    if bool((lengths < 0).any()):
        raise ValueError(f"cache.lengths must be >= 0, got min {int(lengths.min())}")
    if bool((lengths + s > cache.capacity).any()):
        raise ValueError(f"{s} new tokens exceed the cache capacity {cache.capacity}: "
                         f"max cache.lengths {int(lengths.max())}")
