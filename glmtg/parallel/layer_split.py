"""Layer split (``-sm layer``): each process holds a contiguous range of layers and hands its activations on.

Rank r runs layers [start_r, stop_r) (``layer_ranges`` assigns them by ``-ts``-style ratios) with a KV cache
of those layers only. Rank 0 also holds the embedding, the last rank the final norm and the lm_head (a tied
head: the embedding table too). A forward is a relay: rank 0 embeds, every rank runs its layers and sends
[B, S, hidden] to the next one (torch.distributed send/recv), the last computes the logits and broadcasts
them, so every rank returns the same logits and can sample the same token. One rank works at a time.

GGUF blocks (``weight_formats``, as ``Glm4MoeForCausalLM`` takes it): the stage's matrices are the quantized
modules of the whole model in that layout (QuantLinear, QuantExperts, QuantEmbedding), nothing is split inside
a layer, so any mix of formats works. ``tensor_slots`` lists the stage's tensors only: the GGUF loader
(``load_gguf_model(build=...)``) reads those and skips the rest of the file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from glmtg.config import ModelConfig
from glmtg.layers.attention import BACKENDS, StepContext
from glmtg.layers.params import TensorSlot
from glmtg.layers.rope import rope_cos_sin
from glmtg.models.glm4_moe import (
    Glm4MoeForCausalLM,
    check_room,
    decode_weight_bytes_of,
    tensor_slots_of,
    write_slot,
)
from glmtg.parallel.group import TPGroup

if TYPE_CHECKING:
    from glmtg.kv_cache import KVCache
    from glmtg.models.glm4_moe import WeightFormats


def layer_ranges(num_layers: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """[start, stop) of each rank's layers, sizes in proportion to ``ratios`` (llama.cpp's ``-ts``): stage i
    ends at round(num_layers * (r_0 + ... + r_i) / sum(r)), and every stage gets at least one layer."""
    if not ratios or any(not isinstance(r, (int, float)) or isinstance(r, bool) or not r >= 0 for r in ratios):
        raise ValueError(f"ratios must be non-negative numbers, got {list(ratios)!r}")
    total = float(sum(ratios))
    if total <= 0:
        raise ValueError(f"ratios must not all be zero, got {list(ratios)!r}")
    if len(ratios) > num_layers:
        raise ValueError(f"{len(ratios)} ranks need at least as many layers, the model has {num_layers}")
    bounds, cum = [0], 0.0
    for i, r in enumerate(ratios):
        cum += r
        # at least one layer for this stage and one for each stage after it
        stop = min(max(round(num_layers * cum / total), bounds[-1] + 1), num_layers - (len(ratios) - 1 - i))
        bounds.append(stop)
    return list(itertools.pairwise(bounds))


class LayerSplitModel(nn.Module):
    """Rank ``group.rank``'s stage of the model: layers ``layers`` = (start, stop), built on the meta device.

    Parameter names are the whole model's (``layers.{i}.…`` with the global index), so the same checkpoint
    names load it: ``load_tensor`` returns False for a tensor another rank holds. The stage's attention
    modules write layer ``i - start`` of the cache it is given (a cache of ``stop - start`` layers).
    ``weight_formats``: the GGUF block format of each matrix (module docstring); None builds float ones.
    """

    def __init__(self, config: ModelConfig, group: TPGroup, layers: tuple[int, int],
                 dtype: torch.dtype = torch.bfloat16, experts_backend: str = "auto",
                 weight_formats: WeightFormats | None = None) -> None:
        super().__init__()
        start, stop = layers
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= config.num_hidden_layers):
            raise ValueError(f"layers must be (start, stop) with 0 <= start < stop <= {config.num_hidden_layers}, "
                             f"got {layers!r}")
        self.config = config
        self.group = group
        self.start, self.stop = start, stop
        self.first, self.last = group.rank == 0, group.rank == group.world_size - 1
        # On meta (formats too: their modules are built on meta), so only this stage's parameters are ever
        # allocated, by the loader, as it writes them.
        whole = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", experts_backend=experts_backend,
                                   weight_formats=weight_formats)
        # Keyed by the global index, so names stay the whole model's; each attention writes its local layer.
        self.layers = nn.ModuleDict({str(i): whole.layers[i] for i in range(start, stop)})
        for i in range(start, stop):
            whole.layers[i].attn.layer = i - start
        tied = config.tie_word_embeddings
        self.embed = whole.embed if self.first or (self.last and tied) else None
        self.norm = whole.norm if self.last else None
        self.lm_head = whole.lm_head if self.last else None
        self.requires_grad_(False)

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode token reads from this stage (``decode_weight_bytes_of``)."""
        return decode_weight_bytes_of(self, self.config)

    @property
    def num_layers(self) -> int:
        """Layers this stage holds: the ``num_layers`` of its KV cache."""
        return self.stop - self.start

    def holds(self, name: str) -> bool:
        """Whether parameter ``name`` (a whole-model name) is this stage's."""
        head, _, rest = name.partition(".")
        if head == "layers":
            return self.start <= int(rest.partition(".")[0]) < self.stop
        return getattr(self, head, None) is not None

    def tensor_slots(self) -> Iterator[TensorSlot]:
        """The slots of this stage's tensors (whole-model names, as ``Glm4MoeForCausalLM.tensor_slots``):
        what a loader reads for it."""
        return tensor_slots_of(self)

    def load_tensor(self, name: str, value: torch.Tensor, *, shard: str | None = None,
                    expert: int | None = None) -> bool:
        """Write a whole-model checkpoint tensor as ``Glm4MoeForCausalLM.load_tensor`` does; False (storing
        nothing) for one another rank holds."""
        if not self.holds(name):
            return False
        write_slot(self, name, value, shard=shard, expert=expert)
        if name == "embed.weight" and self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight
        return True

    def forward(self, input_ids: torch.Tensor, cache: KVCache, attn_backend: str = "sdpa",
                last_only: bool = False, validate: bool = True) -> torch.Tensor:
        """input_ids [B, S] (the same on every rank) -> fp32 logits [B, S or 1, vocab] on every rank, as the
        whole model's forward (``validate`` likewise checks the room once); ``cache`` holds this stage's
        layers and is not advanced."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {attn_backend!r}")
        bsz, s = input_ids.shape
        if validate and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            check_room(cache, s)
        positions = cache.lengths.to(torch.long)[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
        cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
        ctx = StepContext(cache, cache.lengths + s, cos, sin, attn_backend)
        if self.first:
            x = self.embed(input_ids)  # [B, S, H]
        else:
            x = torch.empty(bsz, s, self.config.hidden_size, dtype=self._dtype(), device=input_ids.device)
            dist.recv(x, src=self.group.rank - 1, group=self.group.group)
        h, residual = x, None
        for layer in self.layers.values():
            h, residual = layer(h, residual, ctx)
        rows = 1 if last_only else s
        logits = torch.empty(bsz, rows, self.config.vocab_size, dtype=torch.float32, device=input_ids.device)
        if not self.last:
            dist.send((h + residual).contiguous(), dst=self.group.rank + 1, group=self.group.group)
        else:
            if last_only:
                h, residual = h[:, -1:], residual[:, -1:]
            logits = self.lm_head(self.norm(h, residual)[0]).float()
        if self.group.world_size > 1:
            dist.broadcast(logits, src=self.group.world_size - 1, group=self.group.group)
        return logits

    def _dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).attn_norm.weight.dtype


def load_split_from_full(model: LayerSplitModel, full: Glm4MoeForCausalLM) -> LayerSplitModel:
    """Fill a stage with the weights of the whole float model ``full`` (for random weights and tests)."""
    for slot, value in full.slot_tensors():
        if model.holds(slot.name):
            model.load_tensor(slot.name, value, shard=slot.shard)
    return model.eval()
