"""Flags, errors, model loading and run metadata shared by the glmtg subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmtg.layers.attention import BACKENDS
from glmtg.config import ModelConfig
from glmtg.engine import Engine
from glmtg.kv_cache import KV_FORMATS
from glmtg.sampling import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
RANDOM_WEIGHTS_SEED = 0  # fixed, so two runs of a preset (e.g. a KLD base and its comparison) share weights


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

def _int_at_least(text: str, minimum: int, wording: str) -> int:
    value = _int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def int_at_least_minus_one(text: str) -> int:
    return _int_at_least(text, -1, "an integer >= -1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


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

def add_model_flags(parser: argparse.ArgumentParser, *, ctx_default: int | None, ub_default: int = 512,
                    ctx_help: str = "context size: the KV cache holds this many tokens") -> None:
    g = parser.add_argument_group("model and cache")
    g.add_argument("-m", "--model", metavar="DIR", default=None,
                   help="HF model directory (config.json, *.safetensors, tokenizer.json); "
                        "without it, random weights of --preset")
    g.add_argument("--preset", choices=ModelConfig.PRESETS, default=None,
                   help="model shape for random weights when no -m is given (default: tiny)")
    g.add_argument("--n-layers", type=positive_int, default=None, metavar="N",
                   help="keep only the first N layers (random weights: a big preset's shapes on one GPU)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto picks cuda when present")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weight and activation dtype")
    g.add_argument("-c", "--ctx-size", type=positive_int, default=ctx_default, metavar="N", help=ctx_help)
    g.add_argument("-ub", "--ubatch-size", type=positive_int, default=ub_default, metavar="N",
                   help="tokens per prefill step (physical batch)")
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


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("-s", "--seed", type=int_at_least_minus_one, default=-1, help="sampling seed; -1 = random")
    g.add_argument("--temp", type=non_negative_float, default=0.8, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=non_negative_int, default=40, help="top-k; 0 = off")
    g.add_argument("--top-p", type=unit_float, default=0.95, help="top-p; 1.0 = off")
    g.add_argument("--min-p", type=unit_float, default=0.05, help="min-p; 0.0 = off")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=None if args.seed < 0 else args.seed)


# ---------------------------------------------------------------- loading

class ByteTokenizer:
    """The documented fallback for random weights (no tokenizer files): one token per UTF-8 byte.

    encode: byte b -> id ``b % vocab_size``; decode: id -> byte ``id % 256`` (invalid UTF-8 shows
    as U+FFFD). Deterministic, so perplexity/KLD runs on a preset are comparable with each other.
    """

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


@dataclass
class Loaded:
    """A model ready for an engine, and how it was obtained (for banners and JSON)."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any  # glmtg.loading.Tokenizer or ByteTokenizer
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


def _weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    from glmtg.models.glm4_moe import Glm4MoeForCausalLM

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load(args: argparse.Namespace, *, need_tokenizer: bool) -> Loaded:
    """Load -m, or build seeded random weights of --preset (tiny by default)."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.model is not None:
        from glmtg.loading import Tokenizer, load_model

        path = Path(args.model)
        if not path.exists():
            raise FileNotFoundError(f"model directory not found: {path}")
        if args.preset is not None:
            raise ValueError("give either -m or --preset, not both")
        if args.n_layers is not None:
            raise ValueError("--n-layers applies to random weights only (no -m)")
        tokenizer = None
        if need_tokenizer:
            if not (path / "tokenizer.json").is_file():
                raise ValueError(f"missing tokenizer: no tokenizer.json in {path}")
            tokenizer = Tokenizer.from_dir(path)
        model, config = load_model(path, dtype=dtype, device=device, progress=sys.stderr.isatty())
        return Loaded(model, config, tokenizer, str(path), False, device, dtype)

    from glmtg.models.glm4_moe import Glm4MoeForCausalLM

    preset = args.preset or "tiny"
    config = ModelConfig.preset(preset)
    name = f"preset {preset}"
    if args.n_layers is not None:
        if args.n_layers > config.num_hidden_layers:
            raise ValueError(f"--n-layers {args.n_layers} exceeds the {config.num_hidden_layers} layers of {preset}")
        config = dataclasses.replace(config, num_hidden_layers=args.n_layers,
                                     first_k_dense_replace=min(config.first_k_dense_replace, args.n_layers))
        name += f", {args.n_layers} layers"
    need = _weight_bytes(config, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.95 * free:
            raise ValueError(f"random weights of {name} need {need / 1e9:.1f} GB but {free / 1e9:.1f} GB of GPU "
                             f"memory is free; use --n-layers N to keep fewer layers")
    model = Glm4MoeForCausalLM.random(config, seed=RANDOM_WEIGHTS_SEED, dtype=dtype, device=device)
    tokenizer = ByteTokenizer(config.vocab_size, config.eos_token_ids)
    return Loaded(model, config, tokenizer, name, True, device, dtype)


def build_engine(args: argparse.Namespace, loaded: Loaded, *, ctx_size: int | None = None) -> Engine:
    return Engine(
        loaded.model, loaded.config,
        ctx_size=ctx_size if ctx_size is not None else args.ctx_size,
        ubatch=args.ubatch_size,
        k_format=args.cache_type_k,
        v_format=args.cache_type_v,
        attn_backend=args.attn,
        prefill_backend=args.attn_prefill,
        device=loaded.device,
        use_cuda_graph=False if args.no_cuda_graph else None,
        random_weights=loaded.random_weights,
        name=loaded.name,
    )


def print_banner(engine: Engine, file: Any = None) -> None:
    banner = engine.banner()
    if banner:
        print(banner, file=file or sys.stdout, flush=True)


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
        "attn": engine.attn_backend,
        "attn_prefill": engine.settings.prefill_backend,
        "ctk": engine.settings.k_format,
        "ctv": engine.settings.v_format,
        "ctx_size": engine.ctx_size,
        "ubatch": engine.ubatch,
        "cuda_graph": engine.uses_cuda_graph,
        "kv_bytes_per_token": engine.cache.bytes_per_token,
    }
