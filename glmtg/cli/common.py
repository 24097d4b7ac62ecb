"""Flags, errors, model loading and run metadata shared by the glmtg subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmtg.cli import experts, ranks
from glmtg.cli.experts import add_placement_flags
from glmtg.config import ModelConfig
from glmtg.cpu.host_experts import host_expert_layers
from glmtg.cpu.placement import HostPlacement, resolve, rules_of
from glmtg.cpu.stream_experts import settings as host_prefill_settings
from glmtg.engine import Engine, EngineConfig, default_ubatch, kv_cache_bytes, kv_cache_hint
from glmtg.files import existing_file
from glmtg.formats import KV_FORMATS
from glmtg.formats.mix import FILE_TYPES
from glmtg.layers.attention import BACKENDS
from glmtg.loading.names import gguf_block_index
from glmtg.loading.presets import (
    RANDOM_WEIGHTS_SEED,
    check_file_type,
    mix_tensor_bytes,
    preset_config,
    preset_tokenizer,
    random_model,
    weight_bytes,
)
from glmtg.memory import check_fits
from glmtg.sampling import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# Library errors name parameters; a user of the CLI knows its flags. Longest names first, so that
# "prefill_backend" is not half-replaced by a shorter name.
PARAMETER_FLAGS = {
    "prefill_backend": "--attn-prefill", "attn_backend": "--attn", "save_top_k": "--kl-top-k",
    "n_chunks": "--chunks", "n_layers": "--n-layers", "ctx_size": "-c", "n_ctx": "-c", "k_format": "-ctk",
    "v_format": "-ctv", "ubatch": "-ub", "file_type": "--type",
}
_PARAMETER_RE = re.compile(r"\b(" + "|".join(PARAMETER_FLAGS) + r")\b")


def as_flags(message: str) -> str:
    """A library message with its parameter names replaced by the CLI flags that set them."""
    return _PARAMETER_RE.sub(lambda m: PARAMETER_FLAGS[m.group(1)], message)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after each option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """argparse with llama.cpp-style one-line errors: ``error: ...`` on stderr, exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------- value types (argparse `type=`)

# Sizes beyond int32 are no real request (positions, token ids and kernel offsets are 32-bit) and would
# make even the planning of a run (one sweep row per ub tokens) take forever; seeds may use 63 bits.
MAX_SIZE = 2**31 - 1
MAX_SEED = 2**63 - 1


def _int_at_least(text: str, minimum: int, wording: str, maximum: int = MAX_SIZE) -> int:
    value = _int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {text!r}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def int_at_least_minus_one(text: str) -> int:
    return _int_at_least(text, -1, "an integer >= -1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def seed_int(text: str) -> int:
    return _int_at_least(text, -1, "an integer >= -1", MAX_SEED)


def non_negative_seed(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0", MAX_SEED)


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


# ---------------------------------------------------------------- flag groups

def add_model_flags(parser: argparse.ArgumentParser, *, ctx_default: int | None, ub_default: int | None = None,
                    ctx_help: str = "context size: the KV cache holds this many tokens") -> None:
    g = parser.add_argument_group("model and cache")
    g.add_argument("-m", "--model", metavar="PATH", default=None,
                   help="HF model directory (config.json, *.safetensors, tokenizer.json) or llama.cpp GGUF file "
                        "(FILE.gguf; split: its first part); without it, random weights of --preset")
    g.add_argument("--preset", choices=ModelConfig.PRESETS, default=None,
                   help="model shape for random weights when no -m is given (default: tiny)")
    g.add_argument("--n-layers", type=positive_int, default=None, metavar="N",
                   help="keep only the first N layers (random weights: a big preset's shapes on one GPU)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto picks cuda when present")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weight and activation dtype")
    g.add_argument("--type", choices=FILE_TYPES, default=None, metavar="T",
                   help="random weights in llama.cpp file type T (its per-tensor quant mix, e.g. Q4_K_M), kept "
                        "in GGUF blocks; default: plain --dtype weights. One of: " + ", ".join(FILE_TYPES))
    g.add_argument("-c", "--ctx-size", type=positive_int, default=ctx_default, metavar="N", help=ctx_help)
    g.add_argument("-ub", "--ubatch-size", type=positive_int, default=ub_default, metavar="N",
                   help="tokens per prefill step (physical batch); default: 4096 on a GPU with >= 100 SMs, "
                        "2048 on smaller GPUs, 512 on a CPU, never above -c")
    g.add_argument("-ctk", "--cache-type-k", choices=KV_FORMATS, default="bf16", help="KV cache type for K")
    g.add_argument("-ctv", "--cache-type-v", choices=KV_FORMATS, default=None,
                   help="KV cache type for V (default: same as -ctk)")
    g.add_argument("--attn", choices=BACKENDS, default="glmtg",
                   help="attention backend (glmtg's decode kernel needs CUDA; "
                        "elsewhere it falls back to the torch path)")
    g.add_argument("--attn-prefill", choices=BACKENDS, default=None,
                   help="attention backend of prefill chunks (default: --attn); e.g. compare --attn eager decode "
                        "without eager prefill's [heads, ub, N_KV] score tensors")
    g.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (compile/capture) before timing")
    ranks.add_split_flags(g)
    add_placement_flags(parser)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("-s", "--seed", type=seed_int, default=-1, help="sampling seed; -1 = random")
    g.add_argument("--temp", type=non_negative_float, default=0.8, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=non_negative_int, default=40, help="top-k; 0 = off")
    g.add_argument("--top-p", type=unit_float, default=0.95, help="top-p; 1.0 = off")
    g.add_argument("--min-p", type=unit_float, default=0.05, help="min-p; 0.0 = off")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=None if args.seed < 0 else args.seed)


# ---------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A model ready for an engine, and how it was obtained (for banners and JSON)."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any  # glmtg.loading.Tokenizer or ByteTokenizer (None when not asked for)
    name: str
    random_weights: bool
    device: torch.device
    dtype: torch.dtype


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device (use cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def random_weights_banner(name: str) -> str:
    """The line every command prints when the weights are random, so no output is mistaken for a model's."""
    return (f"NOTE: RANDOM WEIGHTS ({name}): speed and memory figures are real, generated text and "
            f"perplexity are meaningless; pass -m MODEL_DIR to load a real model")


@dataclass(frozen=True)
class Source:
    """Where the model comes from, with its config read and checked but nothing built yet."""

    config: ModelConfig
    name: str
    path: Path | None  # the -m directory, None for random weights
    host: HostPlacement = HostPlacement()  # layers whose routed experts live in host memory
    host_bytes: int = 0  # bytes those experts take there
    tensor_bytes: dict[str, int] | None = None  # GGUF name -> bytes, where placement flags are given


def model_source(args: argparse.Namespace) -> Source:
    """Read -m's config.json, or the --preset config, and resolve the placement flags: cheap, so every check
    can run before any work."""
    source = _model_source(args)
    flags = getattr(args, "placement", None)
    if not flags:
        experts.check_flags(args, source.config, source.host)
        return source
    if getattr(args, "split_mode", "none") != "none":
        raise ValueError("--cpu-moe, --n-cpu-moe and -ot do not combine with -sm yet")
    if source.path is None and args.type is None or source.path is not None and not _is_gguf(source.path):
        raise ValueError("--cpu-moe, --n-cpu-moe and -ot need GGUF block weights: -m FILE.gguf, or --type T for "
                         "random weights (not a bf16/HF model)")
    sizes = _gguf_tensor_bytes(args, source)
    host = resolve(rules_of(flags), sizes)
    nbytes = sum(n for name, n in sizes.items() if "_exps." in name and host.on_host(gguf_block_index(name)))
    experts.check_flags(args, source.config, host)
    return dataclasses.replace(source, host=host, host_bytes=nbytes, tensor_bytes=sizes)


def _gguf_tensor_bytes(args: argparse.Namespace, source: Source) -> dict[str, int]:
    """GGUF name -> bytes of every tensor the model loads (the file's, or --type's mix)."""
    if source.path is not None:
        from glmtg.loading.gguf_model import gguf_tensor_bytes

        return gguf_tensor_bytes(source.path)
    return mix_tensor_bytes(source.config, args.type)


def _model_source(args: argparse.Namespace) -> Source:
    if args.model is None:
        preset = args.preset or "tiny"
        config = preset_config(preset, args.n_layers)
        check_file_type(config, args.type)
        name = (f"preset {preset}" + (f", {args.n_layers} layers" if args.n_layers is not None else "")
                + (f", {args.type}" if args.type is not None else ""))
        return Source(config, name, None)
    path = Path(args.model)
    if args.preset is not None:
        raise ValueError("give either -m or --preset, not both")
    if args.n_layers is not None:
        raise ValueError("--n-layers applies to random weights only (no -m)")
    if args.type is not None:
        raise ValueError("--type applies to random weights only (no -m)")
    if not path.exists():
        what = "GGUF file" if path.suffix.lower() == ".gguf" else "model directory"
        raise FileNotFoundError(f"{what} not found: {path}")
    if _is_gguf(path):
        from glmtg.loading.gguf_config import gguf_config

        return Source(gguf_config(path), str(path), path)
    if not path.is_dir():
        raise ValueError(f"-m wants a model directory (config.json, *.safetensors, tokenizer.json) or a .gguf "
                         f"file; {path} is another file")
    config_file = path / "config.json"
    if config_file.is_dir():
        raise ValueError(f"{config_file} is a directory, not a file")
    return Source(ModelConfig.from_hf_json(config_file), str(path), path)


def _is_gguf(path: Path | None) -> bool:
    """-m names a GGUF file (the rest of -m's paths are HF directories)."""
    return path is not None and path.is_file() and path.suffix == ".gguf"


def check_memory(args: argparse.Namespace, source: Source, device: torch.device, ctx_size: int) -> None:
    """Weights + KV cache against the device's available memory, before anything is allocated."""
    if source.host_bytes and device.type == "cuda":
        check_fits(f"the routed experts placed in host memory ({_size(source.host_bytes)})", source.host_bytes,
                   torch.device("cpu"), "keep fewer layers' experts on the CPU (--n-cpu-moe, -ot)")
    weights, kv = _device_bytes(args, source, device, ctx_size)
    hint = "use --n-layers N to keep fewer layers" if source.path is None and kv < weights else as_flags(kv_cache_hint())
    check_fits(f"{source.name} in {args.type or args.dtype} "
               f"(weights {_size(weights)} + KV cache for -c {ctx_size} {_size(kv)})",
               weights + kv, device, hint)


def _device_bytes(args: argparse.Namespace, source: Source, device: torch.device, ctx_size: int) -> tuple[int, int]:
    """(weights, KV cache) bytes the device will hold."""
    dtype = DTYPES[args.dtype]
    if _is_gguf(source.path):
        from glmtg.loading.gguf_model import gguf_weight_bytes

        weights = gguf_weight_bytes(source.path, dtype)  # quantized tensors as stored
    else:
        weights = weight_bytes(source.config, dtype, None if source.path is not None else args.type)
    group = ranks.rank_group(args)
    # a rank loading -m reads its part of the file (random weights: each rank draws the whole model first)
    if group is not None and source.path is not None and args.split_mode == "graph":
        # its replicated embedding, head and norms are not counted
        weights //= group.world_size
    elif group is not None and source.path is not None and args.split_mode == "layer":
        # a stage reads its layers' tensors: its share of the layers (embedding and head not counted apart)
        start, stop = ranks.layer_ranges(source.config.num_hidden_layers, ranks.tensor_split(args))[group.rank]
        weights = weights * (stop - start) // source.config.num_hidden_layers
    if source.host_bytes and device.type == "cuda":  # the host-placed experts are not on the GPU
        weights -= source.host_bytes
    v_format = args.cache_type_v or args.cache_type_k
    return weights, kv_cache_bytes(source.config, ctx_size, 1, args.cache_type_k, v_format)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def load_tokenizer(source: Source) -> Any:
    """-m's tokenizer (tokenizer.json, chat template), or the byte tokenizer of random weights."""
    if source.path is None:
        return preset_tokenizer(source.config)
    from glmtg.loading import Tokenizer

    if _is_gguf(source.path):
        from glmtg.loading.gguf import open_gguf

        with open_gguf(source.path) as f:
            return Tokenizer.from_gguf(f.metadata)  # tokenizer.ggml.* and tokenizer.chat_template
    if not (source.path / "tokenizer.json").is_file():
        raise ValueError(f"missing tokenizer: no tokenizer.json in {source.path}")
    return Tokenizer.from_dir(source.path)


def load(args: argparse.Namespace, source: Source, *, ctx_size: int, tokenizer: Any = None) -> Loaded:
    """Load -m, or build seeded random weights of --preset, once the memory they need is known to fit.

    ``tokenizer``: from ``load_tokenizer`` when the command needs one (read first, so that a bad
    tokenizer or prompt fails before the weights load).
    """
    device = ranks.rank_device(args, resolve_device(args.device))
    dtype = DTYPES[args.dtype]
    if getattr(args, "gpu_experts", None) is not None:  # experts back on the device, chosen before allocating
        host, moved = experts.place_gpu_experts(args, source.config, source.host, source.tensor_bytes, device,
                                                sum(_device_bytes(args, source, device, ctx_size)))
        source = dataclasses.replace(source, host=host, host_bytes=source.host_bytes - moved)
    check_memory(args, source, device, ctx_size)
    loaded = _load(args, source, device, dtype, tokenizer)
    experts.start_counting(args, loaded.model, loaded.config)  # --save-expert-counts
    experts.apply_host_prefill(args, loaded.model)  # --host-prefill, --host-prefill-min
    return loaded


def _load(args: argparse.Namespace, source: Source, device: torch.device, dtype: torch.dtype,
          tokenizer: Any) -> Loaded:
    if _is_gguf(source.path):
        from glmtg.loading.gguf_model import load_gguf_model

        model, config = load_gguf_model(source.path, device=device, dtype=dtype, progress=sys.stderr.isatty(),
                                        build=ranks.split_builder(args, dtype), host_experts=source.host)
        return Loaded(model, config, tokenizer, source.name, False, device, dtype)
    if source.path is not None:
        from glmtg.loading import load_model

        model, config = load_model(source.path, dtype=dtype, device=device, progress=sys.stderr.isatty(),
                                   build=ranks.split_builder(args, dtype))
        return Loaded(model, config, tokenizer, source.name, False, device, dtype)
    model = random_model(source.config, seed=RANDOM_WEIGHTS_SEED, dtype=dtype, device=device, file_type=args.type,
                         host_experts=source.host)
    if ranks.rank_group(args) is not None:
        model = ranks.rank_model(args, source.config, model)
    return Loaded(model, source.config, tokenizer, source.name, True, device, dtype)


def engine_config(args: argparse.Namespace, ctx_size: int) -> EngineConfig:
    """The engine settings the model-and-cache flags ask for."""
    ubatch = args.ubatch_size or default_ubatch(resolve_device(args.device), ctx_size)
    return EngineConfig(ctx_size=ctx_size, ubatch=ubatch, k_format=args.cache_type_k,
                        v_format=args.cache_type_v, attn_backend=args.attn, prefill_backend=args.attn_prefill,
                        use_cuda_graph=False if args.no_cuda_graph else None)


def build_engine(args: argparse.Namespace, loaded: Loaded, *, ctx_size: int | None = None) -> Engine:
    settings = engine_config(args, ctx_size if ctx_size is not None else args.ctx_size)
    return Engine(loaded.model, ranks.rank_engine_config(args, loaded.config), settings, device=loaded.device)


def print_banner(loaded: Loaded, file: Any = None) -> None:
    if loaded.random_weights:
        print(random_weights_banner(loaded.name), file=file or sys.stdout, flush=True)


def check_output_file(path: str | Path, what: str) -> Path:
    """An output path that can be written: not a directory, in an existing writable directory.

    Checked before any work, so a long run never ends in a failed write.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory of {what} does not exist: {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {what} {path}: permission denied")
    return path


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file the user named (bytes that are not UTF-8 become U+FFFD)."""
    return existing_file(path, what).read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- run metadata

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(args: argparse.Namespace, loaded: Loaded, engine: Engine) -> dict[str, Any]:
    """Everything needed to tell two result files apart."""
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(loaded.device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "glmtg_commit": _git_commit(),
        "model": loaded.name,
        "model_path": args.model,
        "preset": None if args.model else (args.preset or "tiny"),
        "random_weights": loaded.random_weights,
        "dtype": args.dtype,
        "type": args.type,
        "attn": engine.settings.attn_backend,
        "attn_prefill": engine.settings.prefill_backend,
        "ctk": engine.settings.k_format,
        "ctv": engine.settings.v_format,
        "ctx_size": engine.settings.ctx_size,
        "ubatch": engine.settings.ubatch,
        "cuda_graph": engine.uses_cuda_graph,
        "host_expert_layers": host_expert_layers(loaded.model),
        "host_prefill": host_prefill_settings(loaded.model),
        "kv_bytes_per_token": engine.cache.bytes_per_token,
    }
