"""``--gpu-experts auto[:COUNTS.json]``: with routed experts in host memory (``--cpu-moe``, ``--n-cpu-moe``,
``-ot``), put the most often selected of them back on the GPU, (layer, expert) by (layer, expert), until a
byte budget is filled; the rest stay on the host and each such layer runs split (glmtg.cpu.split_experts).

The budget is the VRAM left after the weights, the KV cache, the streamed prefill's two staging buffers
(``staging_bytes``, unless ``--host-prefill cpu``) and a margin (``gpu_budget``), or an explicit
``--gpu-experts-budget SIZE`` (also how it runs on a CPU-only machine, where the "GPU" is the CPU).

Fill order (``choose_device_experts``): every host-placed (layer, expert) by selections, most first, ties by
layer then expert (stable); each is taken if its bytes still fit (a layer whose experts are bigger, e.g. a
q6_k down stack, may be skipped while smaller ones still fit). Without counts every expert ties, so the
order is by layer: whole layers come back first, as ``--n-cpu-moe`` with a smaller N would place them, and
a layer wholly back on the GPU costs no host round trip at all. A layer whose experts all come back leaves
the host placement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from glmtg.cpu.expert_counts import ExpertCounts
from glmtg.cpu.placement import HostPlacement

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
GIB = 2**30
# VRAM kept free beyond the weights and KV cache: activations, prefill workspaces, the CUDA context's growth.
MARGIN_MIN = GIB
MARGIN_FRACTION = 0.05


def parse_size(text: object, flag: str = "--gpu-experts-budget") -> int:
    """"2GiB", "1.5GB", "512MiB", "800M", "123456" (bytes) -> bytes (GB = 10^9, GiB = 2^30; rounded down).
    ValueError naming ``flag`` for anything else."""
    m = _SIZE.match(text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{flag} wants a size such as 2GiB, 1.5GB or 800MiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_gpu_experts(text: object) -> str | None:
    """``--gpu-experts``'s value -> the counts file it names (None for plain ``auto``: uniform fill).
    ValueError naming the flag unless it is ``auto`` or ``auto:PATH``."""
    if isinstance(text, str) and text == "auto":
        return None
    if isinstance(text, str) and text.startswith("auto:") and len(text) > len("auto:"):
        return text[len("auto:"):]
    raise ValueError(f"--gpu-experts wants auto or auto:COUNTS.json, got {text!r}")


def gpu_budget(free: int, total: int, needed: int) -> int:
    """Bytes of experts the GPU can take: ``free`` now, less ``needed`` (the model's other weights and its KV
    cache, not yet allocated) and a margin of max(1 GiB, 5% of ``total``); 0 when nothing is left."""
    return max(0, free - needed - max(MARGIN_MIN, int(total * MARGIN_FRACTION)))


def staging_bytes(tensor_bytes: Mapping[str, int], layers: Iterable[int]) -> int:
    """Device bytes the streamed prefill of host-placed experts takes (glmtg.cpu.stream_experts): two staging
    buffers of the largest of ``layers``' three expert stacks (whole layers: an upper bound once some of their
    experts come back to the device), plus each stack's alignment; 0 for no layers."""
    sizes = [sum(tensor_bytes.get(f"blk.{layer}.ffn_{p}_exps.weight", 0) + 256 for p in ("gate", "up", "down"))
             for layer in layers]
    return 2 * max(sizes, default=0)


def expert_bytes(tensor_bytes: Mapping[str, int], layers: Iterable[int], num_experts: int) -> dict[int, int]:
    """Bytes of one routed expert (its gate, up and down rows) of each layer, from a GGUF name -> bytes table."""
    out = {}
    for layer in layers:
        names = [f"blk.{layer}.ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
        missing = [n for n in names if n not in tensor_bytes]
        if missing:
            raise ValueError(f"tensor_bytes: no {missing[0]}")
        out[layer] = sum(tensor_bytes[n] for n in names) // num_experts
    return out


def choose_device_experts(per_expert: Mapping[int, int], num_experts: int, budget: int,
                          counts: ExpertCounts | None = None) -> dict[int, frozenset[int]]:
    """The experts of the host layers (``per_expert``: layer -> bytes of one of its experts) that go to the
    device within ``budget`` bytes, per layer (layers with none left out): the module docstring's fill order.
    ``counts``: selections per (layer, expert) (None: uniform); a host layer it does not count is an error."""
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if counts is not None:
        uncounted = sorted(set(per_expert) - set(counts.counts))
        if uncounted:
            raise ValueError(f"counts: no counts for layer {uncounted[0]}")
        if counts.num_experts != num_experts:
            raise ValueError(f"counts: {counts.num_experts} experts per layer, the model has {num_experts}")

    def selections(layer: int, expert: int) -> int:
        return 0 if counts is None else counts.counts[layer][expert]

    order = sorted(((layer, e) for layer in per_expert for e in range(num_experts)),
                   key=lambda le: (-selections(*le), le[0], le[1]))
    chosen: dict[int, set[int]] = {}
    left = budget
    for layer, e in order:
        size = per_expert[layer]
        if size <= left:
            chosen.setdefault(layer, set()).add(e)
            left -= size
    return {layer: frozenset(ids) for layer, ids in sorted(chosen.items())}


def with_device_experts(host: HostPlacement, chosen: Mapping[int, frozenset[int]], num_experts: int
                        ) -> HostPlacement:
    """``host`` with ``chosen`` experts back on the device: a layer given all of them leaves the host layers,
    one given some is split (``HostPlacement.device_experts``)."""
    whole = {layer for layer, ids in chosen.items() if len(ids) == num_experts}
    split = {layer: ids for layer, ids in chosen.items() if ids and layer not in whole}
    unknown = sorted(set(chosen) - set(host.layers))
    if unknown:
        raise ValueError(f"chosen: layer {unknown[0]} has no host-placed experts")
    return HostPlacement(frozenset(host.layers - whole), split)
