"""Which layers' routed experts live in host memory: llama.cpp's ``--cpu-moe``, ``--n-cpu-moe N`` and
``-ot/--override-tensor REGEX=DEVICE``, with llama.cpp's meaning.

llama.cpp turns all three flags into one ordered list of (regex, buffer type) rules, in command-line order
(common/arg.cpp): ``--cpu-moe`` adds ``\\.ffn_(up|down|gate|gate_up)_(ch|)exps`` -> CPU, ``--n-cpu-moe N``
adds ``blk\\.i\\.ffn_...exps`` -> CPU for i < N, and ``-ot`` adds each ``REGEX=DEVICE`` of its comma-separated
list. The loader searches each tensor name against the rules in order and the first match decides
(src/llama-model-loader.cpp: ``std::regex_search``, then ``break``); a tensor no rule matches stays where it
would be. glmtg follows that exactly, with two limits of this slice:

- the unit of placement is a layer's routed experts: gate, up and down exps of one layer must land on the
  same side;
- only routed-expert tensors (``*_exps``) may go to the CPU; a rule that sends any other tensor there is a
  ValueError naming it.

DEVICE is ``CPU`` (host memory) or the GPU (``CUDA0``, ``CUDA1``, ... or ``GPU``, case-insensitive): glmtg
runs a model on one device, so every GPU name means "the device the model runs on" (on a machine without
CUDA that device is the CPU, and host-placed experts still take the CPU expert kernel).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h), the pattern behind --cpu-moe and --n-cpu-moe
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
# The routed-expert stacks of a glm4moe GGUF: the only tensors this slice may place on the CPU
_EXPS_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_GPU_NAME = re.compile(r"^(cuda\d+|gpu)$", re.IGNORECASE)
PLACEMENT_FLAGS = ("--cpu-moe", "--n-cpu-moe", "-ot")


@dataclass(frozen=True)
class Rule:
    """One (regex, device) override: ``device`` "CPU" or "GPU"; ``flag`` the flag (and value) that gave it,
    for messages."""

    pattern: re.Pattern[str]
    device: str
    flag: str


@dataclass(frozen=True)
class HostPlacement:
    """The layers whose routed-expert stacks (gate, up, down exps) live in host memory, as GGUF blocks run by
    the CPU expert kernel; every other weight stays on the model's device. ``device_experts``: for some of
    those layers, the experts that go back to the device (``--gpu-experts``; glmtg/cpu/gpu_experts.py): such
    a layer is split, the listed experts on the device and the rest on the host (a non-empty, proper subset
    of the layer's experts)."""

    layers: frozenset[int] = frozenset()
    device_experts: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = frozenset(self.layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"layers must be ints >= 0, got {sorted(layers, key=repr)!r}")
        object.__setattr__(self, "layers", layers)
        split = {}
        for layer, ids in dict(self.device_experts).items():
            if layer not in layers:
                raise ValueError(f"device_experts: layer {layer!r} is not one of the host layers")
            ids = frozenset(ids)
            if not ids or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
                raise ValueError(f"device_experts[{layer}] must be a non-empty set of ints >= 0, got {sorted(ids)!r}")
            split[layer] = ids
        object.__setattr__(self, "device_experts", MappingProxyType(split))

    def __hash__(self) -> int:  # the mapping is read-only: hash its items
        return hash((self.layers, frozenset(self.device_experts.items())))

    def on_host(self, layer: int) -> bool:
        """Whether layer ``layer``'s routed experts (all, or all but ``device_ids``) live in host memory."""
        return layer in self.layers

    def device_ids(self, layer: int) -> frozenset[int]:
        """The experts of host layer ``layer`` that live on the device instead (empty: none)."""
        return self.device_experts.get(layer, frozenset())

    def __bool__(self) -> bool:
        return bool(self.layers)


def cpu_moe_rules() -> tuple[Rule, ...]:
    """``--cpu-moe``: every routed-expert tensor on the CPU."""
    return (Rule(re.compile(EXPS_REGEX), "CPU", "--cpu-moe"),)


def n_cpu_moe_rules(n: object) -> tuple[Rule, ...]:
    """``--n-cpu-moe N``: the routed-expert tensors of blocks 0 .. N-1 on the CPU (N may exceed the layers:
    the extra rules match nothing). ValueError naming the flag for anything but an int >= 0."""
    if isinstance(n, str):
        try:
            n = int(n)
        except ValueError:
            raise ValueError(f"--n-cpu-moe must be an integer >= 0, got {n!r}") from None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"--n-cpu-moe must be an integer >= 0, got {n!r}")
    return tuple(Rule(re.compile(rf"blk\.{i}{EXPS_REGEX}"), "CPU", f"--n-cpu-moe {n}") for i in range(n))


def override_rules(text: object) -> tuple[Rule, ...]:
    """``-ot REGEX=DEVICE[,REGEX=DEVICE...]``: one rule per comma-separated item, split at its first '='
    (as llama.cpp does: a regex holds no ',' or '='). ValueError naming -ot for an item without '=', a regex
    that does not compile, or a device that is neither CPU nor a GPU."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"-ot wants REGEX=DEVICE, got {text!r}")
    rules = []
    for item in text.split(","):
        regex, eq, device = item.partition("=")
        if not eq:
            raise ValueError(f"-ot wants REGEX=DEVICE, got {item!r} (no '=')")
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ValueError(f"-ot {item!r}: bad regex: {e}") from None
        if device.upper() == "CPU":
            where = "CPU"
        elif _GPU_NAME.match(device):
            where = "GPU"
        else:
            raise ValueError(f"-ot {item!r}: unknown device {device!r} (use CPU, or CUDA0 / GPU for the model's "
                             f"device)")
        rules.append(Rule(pattern, where, f"-ot {item}"))
    return tuple(rules)


def rules_of(flags: Iterable[tuple[str, object]]) -> tuple[Rule, ...]:
    """The rules of placement flags in command-line order: (flag, value) pairs, flag one of
    ``PLACEMENT_FLAGS`` (long and short spellings: --cpu-moe/-cmoe, --n-cpu-moe/-ncmoe,
    -ot/--override-tensor); --cpu-moe's value is ignored."""
    rules: list[Rule] = []
    for flag, value in flags:
        if flag in ("--cpu-moe", "-cmoe"):
            rules.extend(cpu_moe_rules())
        elif flag in ("--n-cpu-moe", "-ncmoe"):
            rules.extend(n_cpu_moe_rules(value))
        elif flag in ("-ot", "--override-tensor"):
            rules.extend(override_rules(value))
        else:
            raise ValueError(f"flags: unknown placement flag {flag!r} (use one of {', '.join(PLACEMENT_FLAGS)})")
    return tuple(rules)


def resolve(rules: Iterable[Rule], tensor_names: Iterable[str]) -> HostPlacement:
    """The host placement the rules give a model with these GGUF tensor names (its main tensors: the MTP
    blocks are not loaded). First matching rule wins per tensor (``re.search``, as llama.cpp's
    ``std::regex_search``). ValueError for a rule that sends a tensor other than ``*_exps`` to the CPU,
    or a layer whose gate, up and down exps would end up on different sides."""
    rules = tuple(rules)
    per_layer: dict[int, dict[str, str]] = {}  # layer -> {tensor: "CPU"/"GPU"} for its exps tensors
    for name in tensor_names:
        rule = next((r for r in rules if r.pattern.search(name)), None)
        where = "GPU" if rule is None else rule.device
        exps = _EXPS_NAME.match(name)
        if exps is None:
            if where == "CPU":
                raise ValueError(f"{rule.flag}: places tensor {name} on the CPU, but only routed-expert tensors "
                                 f"(*_exps) can be placed on the CPU for now")
            continue
        per_layer.setdefault(int(exps.group(1)), {})[name] = where
    host = set()
    for layer, sides in per_layer.items():
        if len(set(sides.values())) > 1:
            on_cpu = sorted(n for n, w in sides.items() if w == "CPU")
            raise ValueError(f"the placement flags put only {', '.join(on_cpu)} of layer {layer}'s routed experts "
                             f"on the CPU: gate, up and down exps of a layer must be placed together for now")
        if "CPU" in sides.values():
            host.add(layer)
    return HostPlacement(frozenset(host))
