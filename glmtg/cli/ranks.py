"""``-sm graph`` / ``-sm layer`` with ``--gpus N``: one command starts N ranks that each run the subcommand on
their part of the model (glmtg.parallel), NCCL on GPUs (rank r on cuda:r) and gloo on CPU.

Every rank runs the same subcommand with the same flags; the split modes give every rank the same logits,
so every rank samples the same tokens and walks the same steps. Rank 0 alone prints (the others' stdout and
stderr go to /dev/null). ``serve`` is the exception: rank 0 serves and the other ranks run the model steps
it sends them (glmtg.serve.split). Random weights (float, or ``--type`` GGUF blocks): each rank draws the whole model
once and keeps its part. ``-m FILE.gguf`` or ``-m HF_DIR``: each rank builds its part on the meta device
(``-sm graph``: its slices of every layer; ``-sm layer``: its stage of whole layers; ``split_builder``) and
reads only its tensors, or their slices, from the file (``load_gguf_model(build=...)``; for a safetensors
directory ``load_model(build=...)``, which reads a tensor-parallel rank's rows or columns with ``get_slice``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.multiprocessing as mp

from glmtg.config import ModelConfig
from glmtg.parallel import (
    LayerSplitModel,
    TPGroup,
    build_tp_model,
    layer_ranges,
    load_from_full,
    load_split_from_full,
)
from glmtg.parallel.experts import DEFAULT_EXPERTS_SPLIT, EXPERT_SPLITS
from glmtg.parallel.launch import rank_cache_config, spawn

SPLIT_MODES = ("none", "layer", "graph")


def add_split_flags(group: Any) -> None:
    """-sm, --gpus, -ts on the model flags' argument group."""
    group.add_argument("-sm", "--split-mode", choices=SPLIT_MODES, default="none",
                       help="several ranks: graph = tensor parallel in every layer, layer = ranges of layers")
    group.add_argument("--gpus", type=int, default=1, metavar="N",
                       help="ranks to start with -sm (GPUs 0..N-1 with CUDA, N gloo processes on CPU)")
    group.add_argument("-ts", "--tensor-split", default=None, metavar="R0,R1,...",
                       help="-sm layer: layers per rank in these proportions (default: even)")
    group.add_argument("--tp-experts", default=None, metavar="width|expert",
                       help="-sm graph: split the routed experts along their inner width (every rank 1/N of each "
                            f"expert) or by expert (each rank a range of whole experts); default {DEFAULT_EXPERTS_SPLIT}")


def check_split_args(args: argparse.Namespace) -> None:
    """ValueError (naming the flags) for a split the first slice cannot run; nothing for -sm none."""
    if args.tp_experts is not None:
        if args.split_mode != "graph":
            raise ValueError("--tp-experts applies to -sm graph")
        if args.tp_experts not in EXPERT_SPLITS:
            raise ValueError(f"--tp-experts must be one of {', '.join(EXPERT_SPLITS)}, got {args.tp_experts!r}")
    if args.split_mode == "none":
        if args.gpus != 1 or args.tensor_split is not None:
            raise ValueError("--gpus and -ts need -sm layer or -sm graph")
        return
    if args.gpus < 1:
        raise ValueError(f"--gpus must be a positive int, got {args.gpus}")
    if args.tensor_split is not None and args.split_mode != "layer":
        raise ValueError("-ts applies to -sm layer")
    ratios = tensor_split(args)
    from glmtg.cli.common import model_source  # the config only: cheap, before any rank starts

    source = model_source(args)
    config = source.config
    if args.split_mode == "graph":
        # every rank's part builds (on meta: cheap), so an unsplittable width fails here, once, with its name
        formats = _weight_formats(args, source)
        for rank in range(args.gpus):
            build_tp_model(config, TPGroup(rank, args.gpus), torch.float32, weight_formats=formats,
                           experts_split=experts_split(args))
    else:
        layer_ranges(config.num_hidden_layers, ratios)


def experts_split(args: argparse.Namespace) -> str:
    """The routed experts' split of ``-sm graph`` (--tp-experts, else ``DEFAULT_EXPERTS_SPLIT``)."""
    return DEFAULT_EXPERTS_SPLIT if args.tp_experts is None else args.tp_experts


def tensor_split(args: argparse.Namespace) -> list[float]:
    """The -ts ratios, one per rank (even without -ts)."""
    if args.tensor_split is None:
        return [1.0] * args.gpus
    try:
        ratios = [float(r) for r in args.tensor_split.split(",")]
    except ValueError:
        raise ValueError(f"-ts must be comma-separated numbers, got {args.tensor_split!r}") from None
    if len(ratios) != args.gpus:
        raise ValueError(f"-ts gives {len(ratios)} ratios for --gpus {args.gpus}")
    return ratios


def launch(args: argparse.Namespace) -> int:
    """Run ``args.run(args)`` on ``--gpus`` ranks; the exit status of the first rank that failed, else 0."""
    check_split_args(args)
    cuda = torch.cuda.is_available() and not str(args.device).startswith("cpu")
    try:
        spawn(_rank_main, args.gpus, (args,), backend="nccl" if cuda else "gloo")
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


def _rank_main(group: TPGroup, args: argparse.Namespace) -> None:
    if group.rank:
        devnull = open(os.devnull, "w")  # noqa: SIM115 - open as long as the rank runs
        sys.stdout = sys.stderr = devnull
    from glmtg.cli import run_command

    args.rank_group = group
    rc = run_command(args)
    if rc:
        sys.exit(rc)


def rank_group(args: argparse.Namespace) -> TPGroup | None:
    """This process's rank when the command runs split over several, else None."""
    return getattr(args, "rank_group", None)


def writes_files(args: argparse.Namespace) -> bool:
    """Whether this process writes the command's output files: every rank computes them, rank 0 alone
    writes (two ranks writing one path interleave their bytes)."""
    group = rank_group(args)
    return group is None or group.rank == 0


def rank_device(args: argparse.Namespace, device: torch.device) -> torch.device:
    group = rank_group(args)
    return device if group is None or device.type != "cuda" else torch.device("cuda", group.rank)


def _weight_formats(args: argparse.Namespace, source: Any) -> Any:
    """The ``weight_formats`` of the model the flags name: --type's mix, a GGUF file's types, else None."""
    if args.type is not None:
        from glmtg.formats.mix import weight_formats_for

        return weight_formats_for(args.type, source.config)
    if source.path is not None and source.path.is_file():  # a GGUF file; an HF directory holds float weights
        from glmtg.loading.gguf import open_gguf
        from glmtg.loading.gguf_model import weight_formats_of

        with open_gguf(source.path) as f:
            return weight_formats_of(f, source.config)
    return None


def rank_model(args: argparse.Namespace, config: ModelConfig, full: torch.nn.Module) -> torch.nn.Module:
    """This rank's part of ``full`` (the whole random model, float or --type's blocks), on ``full``'s device."""
    group = rank_group(args)
    dtype = full.dtype
    formats = None
    if args.type is not None:
        from glmtg.formats.mix import weight_formats_for

        formats = weight_formats_for(args.type, config)
    if args.split_mode == "graph":
        return load_from_full(build_tp_model(config, group, dtype, weight_formats=formats,
                                             experts_split=experts_split(args)), full)
    layers = layer_ranges(config.num_hidden_layers, tensor_split(args))[group.rank]
    return load_split_from_full(LayerSplitModel(config, group, layers, dtype, weight_formats=formats), full)


def split_builder(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """The ``build`` of ``load_gguf_model`` and of ``load_model`` (HF directories) for this rank: its
    ``-sm graph`` part or its ``-sm layer`` stage, on the meta device, in ``dtype``; None when not split."""
    group = rank_group(args)
    if group is None:
        return None
    if args.split_mode == "graph":
        split = experts_split(args)
        return lambda config, formats: build_tp_model(config, group, dtype, weight_formats=formats,
                                                      experts_split=split)
    ratios = tensor_split(args)

    def stage(config: ModelConfig, formats: Any) -> LayerSplitModel:
        layers = layer_ranges(config.num_hidden_layers, ratios)[group.rank]
        return LayerSplitModel(config, group, layers, dtype, weight_formats=formats)

    return stage


def rank_engine_config(args: argparse.Namespace, config: ModelConfig) -> ModelConfig:
    """The config this rank's Engine gets (its KV cache's shape); ``config`` itself when not split."""
    group = rank_group(args)
    if group is None:
        return config
    layers = None
    if args.split_mode == "layer":
        layers = layer_ranges(config.num_hidden_layers, tensor_split(args))[group.rank]
    return rank_cache_config(config, args.split_mode, group, layers)
