"""``glmtg make-gguf``: a random-weight preset in a llama.cpp quant mix, written as a GGUF file llama.cpp loads.

The same model ``--preset P --type T`` builds for sweep-bench (same seed, same values), so glmtg and
llama.cpp / ik_llama.cpp can be benchmarked on one file. Like a converted GLM file it holds the preset's
next-token-prediction (MTP) blocks after the main layers (random too; ``--no-mtp`` leaves them out), which
glmtg and llama.cpp skip when decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from glmtg.cli import common
from glmtg.config import ModelConfig
from glmtg.formats.mix import FILE_TYPES, tensor_type
from glmtg.loading.gguf_writer import model_tensors, random_mtp_tensors, write_gguf
from glmtg.loading.presets import (
    RANDOM_WEIGHTS_SEED,
    check_file_type,
    preset_config,
    random_model,
    weight_bytes,
)
from glmtg.memory import check_fits


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("make-gguf", help="write a random-weight preset as a GGUF file",
                              description="Build seeded random weights of a preset in a llama.cpp file type "
                                          "(its per-tensor quant mix) and write them as a GGUF file with "
                                          "llama.cpp's tensor names, metadata and a synthetic tokenizer.")
    p.add_argument("--preset", choices=ModelConfig.PRESETS, required=True, help="model shape")
    p.add_argument("--n-layers", type=common.positive_int, default=None, metavar="N",
                   help="keep only the first N layers")
    p.add_argument("--type", choices=FILE_TYPES, required=True, metavar="T",
                   help="llama.cpp file type, one of: " + ", ".join(FILE_TYPES))
    p.add_argument("--seed", type=common.non_negative_seed, default=RANDOM_WEIGHTS_SEED,
                   help="random weights seed (the other commands use the default)")
    p.add_argument("--device", default="auto", help="where the weights are drawn and quantized: cuda, cuda:N, cpu")
    p.add_argument("--no-mtp", action="store_true",
                   help="leave out the preset's next-token-prediction (MTP) blocks, which glmtg and llama.cpp skip "
                        "when decoding (llama.cpp's converter writes them unless told --no-mtp)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the GGUF file to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = common.check_output_file(args.output, "output file")
    config = preset_config(args.preset, args.n_layers)
    if args.no_mtp:  # llama-quantize's per-layer choices count the MTP blocks: the mix must not count absent ones
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    check_file_type(config, args.type)
    device = common.resolve_device(args.device)
    # the whole model is built on the device before it is written (plus one slot's float values at a time)
    check_fits(f"preset {args.preset} in {args.type}", weight_bytes(config, torch.bfloat16, args.type), device,
               "use --n-layers N to keep fewer layers")
    model = random_model(config, seed=args.seed, device=device, file_type=args.type)
    # Slots the model keeps in float (norms, biases, router) are written in the type llama-quantize leaves them.
    def fmt_of(name: str, shape: tuple[int, ...]) -> str:
        return tensor_type(args.type, name, shape, config)

    # MTP blocks: drawn from their own stream (seed + 1) while they are written, after the main model
    tensors = [*model_tensors(model, fmt_of), *random_mtp_tensors(config, fmt_of, seed=args.seed + 1, device=device)]
    name = f"glmtg random {args.preset}" + (f" {args.n_layers} layers" if args.n_layers else "") + f" {args.type}"
    write_gguf(out, config, tensors, file_type=args.type, name=name, progress=sys.stderr.isatty())
    print(f"wrote {out} ({out.stat().st_size / 1e9:.3f} GB): {name}, seed {args.seed}", file=sys.stderr)
    return 0
