"""Expert placement flags: llama.cpp's ``--cpu-moe``, ``--n-cpu-moe N``, ``-ot REGEX=DEV`` (glmtg/cpu/placement.py),
glmtg's ``--gpu-experts auto[:COUNTS.json]`` / ``--gpu-experts-budget SIZE`` (glmtg/cpu/gpu_experts.py),
``--host-prefill gpu|cpu`` / ``--host-prefill-min N`` (glmtg/cpu/stream_experts.py) and
``--save-expert-counts FILE`` (glmtg/cpu/expert_counts.py): parsing, checks before any work, and the counts
written when the command ends."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.cpu.expert_counts import ExpertCounter, ExpertCounts
from glmtg.cpu.gpu_experts import (
    choose_device_experts,
    expert_bytes,
    gpu_budget,
    parse_gpu_experts,
    parse_size,
    staging_bytes,
    with_device_experts,
)
from glmtg.cpu.placement import HostPlacement, rules_of
from glmtg.cpu.stream_experts import MIN_TOKENS, parse_host_prefill, parse_min_tokens

_counters: list[tuple[ExpertCounter, Path]] = []  # counting since the model loaded; written by write_counts


class _PlacementFlag(argparse.Action):
    """Appends (flag, value) to args.placement, keeping the order of all three flags (the first matching
    rule wins, as in llama.cpp); each value is checked as it is parsed (one error line, exit 2)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            rules_of([(option_string, values)])
        except ValueError as e:
            parser.error(str(e))
        # a new list each time (the three flags share one dest)
        namespace.placement = [*(getattr(namespace, "placement", None) or []), (option_string, values)]


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser whose ValueError reads "FLAG wants ...": argparse names the flag itself,
    so the message keeps what follows it (one error line, exit 2)."""
    def check(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).partition(" ")[2] or str(e)) from None
    check.__name__ = parse.__name__
    return check


def _gpu_experts_value(text: str) -> str:
    parse_gpu_experts(text)
    return text


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert placement (GGUF weights: -m FILE.gguf or --type T)")
    g.add_argument("-cmoe", "--cpu-moe", action=_PlacementFlag, nargs=0, dest="placement", default=None,
                   help="keep all routed experts in host memory, run by the CPU expert kernel")
    g.add_argument("-ncmoe", "--n-cpu-moe", action=_PlacementFlag, dest="placement", metavar="N", default=None,
                   help="keep the routed experts of the first N layers in host memory")
    g.add_argument("-ot", "--override-tensor", action=_PlacementFlag, dest="placement", metavar="REGEX=DEV,...",
                   default=None, help="place the GGUF tensors whose name REGEX matches on DEV (CPU, or CUDA0/GPU: "
                                    "the model's device); repeatable, first match wins; only *_exps tensors "
                                    "may go to the CPU for now")
    g.add_argument("--gpu-experts", metavar="auto[:COUNTS.json]", default=None,
                   type=_checked(_gpu_experts_value),
                   help="of the host-placed experts, put the most often selected (COUNTS.json, from "
                        "--save-expert-counts) back on the GPU until the VRAM left after weights, KV cache and "
                        "a margin is full; plain auto (no counts) fills by layer order")
    g.add_argument("--gpu-experts-budget", metavar="SIZE", default=None, type=_checked(parse_size),
                   help="bytes of experts --gpu-experts may put on the device (e.g. 20GiB, 1.5GB); default: the "
                        "free VRAM less weights, KV cache and max(1 GiB, 5%%); required on a CPU device")
    g.add_argument("--host-prefill", metavar="gpu|cpu", default=None, type=_checked(parse_host_prefill),
                   help="where prefill chunks run host-placed experts: gpu (default: each layer's blocks are "
                        "copied to the GPU, double-buffered, and run there; costs 2 x the largest host layer "
                        "of VRAM) or cpu (the CPU expert kernel, no VRAM)")
    g.add_argument("--host-prefill-min", metavar="N", default=None, type=_checked(parse_min_tokens),
                   help=f"--host-prefill gpu streams batches of at least N tokens (default {MIN_TOKENS}); "
                        "smaller ones (decode) run on the CPU")
    g.add_argument("--save-expert-counts", metavar="FILE", default=None,
                   help="count how often each layer's router selects each expert while the command runs, and "
                        "write them to FILE (JSON) when it ends: with perplexity -f TEXT, the calibration "
                        "counts for --gpu-experts auto:FILE")


def check_flags(args: argparse.Namespace, config: ModelConfig, host: HostPlacement) -> None:
    """Before any work: --gpu-experts needs host-placed experts, its counts file is this model's, and the
    counts output can be written. ValueError naming the flag."""
    from glmtg.cli.common import check_output_file

    gpu_experts = getattr(args, "gpu_experts", None)
    if getattr(args, "gpu_experts_budget", None) is not None and gpu_experts is None:
        raise ValueError("--gpu-experts-budget applies to --gpu-experts auto[:COUNTS.json]")
    if gpu_experts is not None:
        if not host:
            raise ValueError("--gpu-experts moves host-placed experts back to the GPU: add --cpu-moe (or "
                             "--n-cpu-moe N, -ot ...=CPU)")
        path = parse_gpu_experts(gpu_experts)
        if path is not None:
            ExpertCounts.load(path, config)
    for flag in ("host_prefill", "host_prefill_min"):
        if getattr(args, flag, None) is not None and not host:
            raise ValueError(f"--{flag.replace('_', '-')} applies to host-placed experts: add --cpu-moe (or "
                             f"--n-cpu-moe N, -ot ...=CPU)")
    if getattr(args, "save_expert_counts", None) is not None:
        if getattr(args, "split_mode", "none") != "none":
            raise ValueError("--save-expert-counts does not combine with -sm yet")
        check_output_file(args.save_expert_counts, "--save-expert-counts")


def place_gpu_experts(args: argparse.Namespace, config: ModelConfig, host: HostPlacement,
                      tensor_bytes: dict[str, int], device: torch.device, needed: int) -> tuple[HostPlacement, int]:
    """--gpu-experts: ``host`` with the chosen experts back on ``device``, and the bytes moved there.
    ``needed``: bytes the device must hold besides the experts (its other weights and the KV cache)."""
    n = config.n_routed_experts
    per_expert = expert_bytes(tensor_bytes, sorted(host.layers), n)
    path = parse_gpu_experts(args.gpu_experts)
    if args.gpu_experts_budget is not None:
        budget = args.gpu_experts_budget
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if (getattr(args, "host_prefill", None) or "gpu") == "gpu":  # the streamed prefill's buffers
            needed += staging_bytes(tensor_bytes, host.layers)
        budget = gpu_budget(free, total, needed)
    else:
        raise ValueError("--gpu-experts on a CPU device has no VRAM to fill: give --gpu-experts-budget SIZE")
    counts = ExpertCounts.load(path, config) if path is not None else None
    if counts is None:
        warnings.warn("--gpu-experts auto without counts: experts go back to the GPU by layer order (gather "
                      "counts with --save-expert-counts FILE, then --gpu-experts auto:FILE)", UserWarning,
                      stacklevel=2)
    chosen = choose_device_experts(per_expert, n, budget, counts)
    placed = with_device_experts(host, chosen, n)
    moved = sum(len(ids) * per_expert[layer] for layer, ids in chosen.items())
    print(f"gpu-experts: {sum(map(len, chosen.values()))} of {len(per_expert) * n} host-placed experts on "
          f"{device.type} ({_size(moved)} of a {_size(budget)} budget): "
          f"{len(host.layers) - len(placed.layers)} layer(s) wholly, {len(placed.device_experts)} split",
          file=sys.stderr, flush=True)
    return placed, moved


def apply_host_prefill(args: argparse.Namespace, model: nn.Module) -> None:
    """--host-prefill / --host-prefill-min: set the loaded model's prefill of host-placed experts."""
    from glmtg.cpu import stream_experts

    mode = getattr(args, "host_prefill", None) or "gpu"
    stream_experts.configure(model, mode, getattr(args, "host_prefill_min", None) or MIN_TOKENS)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e3:.1f} kB" if n < 1e5 else f"{n / 1e6:.1f} MB"


def start_counting(args: argparse.Namespace, model: nn.Module, config: ModelConfig) -> None:
    """--save-expert-counts FILE: count from now on; ``write_counts`` saves when the command ends."""
    path = getattr(args, "save_expert_counts", None)
    if path is not None:
        _counters.append((ExpertCounter(model, config), Path(path)))


def write_counts() -> None:
    """Save (and stop) every count started by ``start_counting`` in this process."""
    while _counters:
        counter, path = _counters.pop()
        counts = counter.snapshot()
        counter.close()
        counts.save(path)
        print(f"saved expert counts ({counts.selections} selections in {len(counts.counts)} MoE layers) to "
              f"{path}", file=sys.stderr, flush=True)
