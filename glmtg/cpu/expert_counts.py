"""How often the router of each MoE layer selects each routed expert: gathered while a model runs, saved as
JSON with the model's identity, reloaded to place the most selected experts on the GPU (``--gpu-experts``).

``ExpertCounter`` counts on the model's device (a forward hook on every MoE router adds its top-k ids into
an int64 [E] tensor per layer: no host sync, so it also runs inside a captured CUDA graph step), and
``ExpertCounts`` is the host-side record: per MoE layer, the selections of each expert.

A file's identity is the model's shape, not its weights: layers, routed experts, and a fingerprint of the
config fields that define the architecture (``model_fingerprint``). So counts gathered with one
quantization of a model serve every quantization of it (routing barely depends on the expert formats);
two fine-tunes of one architecture share an identity (their counts would only place experts less well:
the split layers stay exact whatever the counts say).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.files import existing_file

FORMAT = "glmtg-expert-counts"
VERSION = 1
# Fields that do not change what the routers compute (stop tokens, the context limit) stay out of the identity.
_NOT_IDENTITY = ("eos_token_ids", "max_position_embeddings")


def model_fingerprint(config: ModelConfig) -> str:
    """16 hex digits of SHA-256 over the config's architecture fields (sorted JSON): the same for an HF
    directory and a GGUF file of one model, different for another shape."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def moe_layers(config: ModelConfig) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


@dataclass(frozen=True)
class ExpertCounts:
    """Selections per (MoE layer, expert): ``counts[layer][e]``, every MoE layer of the model, each a tuple of
    ``num_experts`` ints >= 0; ``layers``/``num_experts``/``fingerprint`` identify the model."""

    layers: int
    num_experts: int
    fingerprint: str
    counts: Mapping[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        counts = {}
        for layer, row in dict(self.counts).items():
            row = tuple(row)
            if (not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.layers
                    or len(row) != self.num_experts
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row)):
                raise ValueError(f"counts[{layer!r}] must be {self.num_experts} ints >= 0 for a layer in "
                                 f"[0, {self.layers})")
            counts[layer] = row
        object.__setattr__(self, "counts", dict(sorted(counts.items())))

    @classmethod
    def empty(cls, config: ModelConfig) -> ExpertCounts:
        return cls(config.num_hidden_layers, config.n_routed_experts, model_fingerprint(config),
                   {i: (0,) * config.n_routed_experts for i in moe_layers(config)})

    @property
    def selections(self) -> int:
        """All (token, expert) selections counted, over every layer."""
        return sum(sum(row) for row in self.counts.values())

    def check(self, config: ModelConfig, what: str) -> None:
        """ValueError naming ``what`` (the file) unless these counts are of ``config``'s model."""
        want = (config.num_hidden_layers, config.n_routed_experts, model_fingerprint(config))
        got = (self.layers, self.num_experts, self.fingerprint)
        if got != want:
            raise ValueError(f"{what} holds expert counts of another model ({got[0]} layers, {got[1]} experts, "
                             f"fingerprint {got[2]}; this model: {want[0]} layers, {want[1]} experts, "
                             f"fingerprint {want[2]})")
        if set(self.counts) != set(moe_layers(config)):
            raise ValueError(f"{what} does not count this model's MoE layers {moe_layers(config)}")

    def save(self, path: str | os.PathLike) -> None:
        data = {"format": FORMAT, "version": VERSION, "layers": self.layers, "experts": self.num_experts,
                "fingerprint": self.fingerprint, "counts": {str(k): list(v) for k, v in self.counts.items()}}
        Path(path).write_text(json.dumps(data) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike, config: ModelConfig | None = None) -> ExpertCounts:
        """Read a file ``save`` wrote; with ``config``, also ``check`` it is that model's. ValueError naming the
        file for anything else (OSError when it cannot be read)."""
        what = f"expert counts file {os.fspath(path)}"
        try:
            data = json.loads(existing_file(path, "expert counts file").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{what} is not a glmtg expert counts file (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ValueError(f"{what} has version {data.get('version')!r}; this glmtg reads version {VERSION}")
        try:
            counts = cls(data["layers"], data["experts"], data["fingerprint"],
                         {int(k): v for k, v in data["counts"].items()})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{what} is malformed: {e}") from None
        if config is not None:
            counts.check(config, what)
        return counts


class ExpertCounter:
    """Counts the experts every MoE router of ``model`` selects from now on (``snapshot`` reads them).

    The counts live on the routers' device; the hook adds each forward's ids with ``scatter_add_`` (integer
    adds: exact in any order). Every token a router sees counts, warm-up and padded batch rows included
    (a handful next to a calibration text). ``close`` removes the hooks."""

    def __init__(self, model: nn.Module, config: ModelConfig) -> None:
        from glmtg.layers.moe import Router

        self.config = config
        self._counts: dict[int, torch.Tensor] = {}
        self._hooks = []
        for name, module in model.named_modules():
            if isinstance(module, Router):
                layer = int(name.split(".")[1])  # "layers.{i}.mlp.router"
                self._counts[layer] = torch.zeros(config.n_routed_experts, dtype=torch.int64,
                                                  device=module.weight.device)
                self._hooks.append(module.register_forward_hook(self._hook(self._counts[layer])))
        if set(self._counts) != set(moe_layers(config)):
            raise ValueError(f"model: routers at layers {sorted(self._counts)}, the config's MoE layers are "
                             f"{moe_layers(config)}")

    @staticmethod
    def _hook(counts: torch.Tensor):
        def add(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            ids = output[0].reshape(-1)
            counts.scatter_add_(0, ids, torch.ones_like(ids))
        return add

    def snapshot(self) -> ExpertCounts:
        """The counts so far (one host read per layer)."""
        rows = {layer: tuple(int(c) for c in t.tolist()) for layer, t in self._counts.items()}
        return ExpertCounts(self.config.num_hidden_layers, self.config.n_routed_experts,
                            model_fingerprint(self.config), rows)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
