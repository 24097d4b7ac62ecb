"""Quality and decode speed of llama.cpp quant mixes on one preset: each file type against the bf16 model
of the same random weights.

    python bench/quant_kld.py                                   # glm-4.5-air, 8 layers, the default types
    python bench/quant_kld.py --types Q8_0 Q4_K_M IQ4_XS --depth 8192
    python bench/quant_kld.py --preset tiny --types Q8_0 Q4_0 --chunks 2 -c 64 --device cpu   # CPU check
    python bench/quant_kld.py --from-json RUN.json              # redraw RUN.md and RUN.png

Base: the preset's random weights in --dtype (seed --seed), run over the text (-f; default the repository's
README.md, tokenized as the CLI tokenizes for random presets: one token per byte) in chunks of -c tokens,
llama-perplexity's method (each chunk from an empty cache, second half scored). Its top-K log-probs stay in
memory (glmtg.eval.kld). Then for each type: the same weights quantized to that llama.cpp mix
(glmtg.loading.presets.random_model(file_type=T): the same float draws, then glmtg.formats.quantize_blocks),
the same chunks: PPL, mean KLD against the base, its 99th percentile and the top-1 agreement. Then the
decode speed (glmtg.eval.sweep.run_sweep, the CUDA-graph decode step where the device is CUDA): --tg
tokens of batch-1 decode timed at cache depth 0 and at --depth (rows every -ub tokens in between). Only
one model is on the device at a time.

Random weights give near-uniform next-token distributions, so the PPL is about the vocabulary size and
the KLDs are far smaller than on a trained model: they rank the mixes (what the quantization error
does to the logits), they do not predict a real model's numbers. Speeds and bytes are real. The K and IQ4
blocks come from glmtg's own quantizer (glmtg/formats/gguf_quantize_k.py: RMSE 0.94-1.07x llama.cpp's
without an importance matrix), so their KLDs are those of that quantizer, not of llama-quantize's files.

bits/weight: the model's parameter bytes (quantized blocks, and the float norms, biases and fp32 router
as stored) x 8 over the base model's parameter count, as llama.cpp counts a file's BPW. "GB/s @0": the
bytes one decode token reads (model.decode_weight_bytes(): the chosen experts only, one embedding row,
plus the KV cache) x tokens/s at depth 0.

Writes <STEM>.json (environment, settings, every row with its sweep rows and full KLD statistics),
<STEM>.md (the table) and <STEM>.png (mean KLD and TG speed against bits/weight); STEM defaults to
results/quant_kld/<date>-<preset>.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, write_json  # noqa: E402

from glmtg.config import ModelConfig  # noqa: E402
from glmtg.engine import Engine, EngineConfig, kv_cache_bytes  # noqa: E402
from glmtg.eval.kld import DEFAULT_TOP_K, KldBase, kld_summary  # noqa: E402
from glmtg.eval.perplexity import evaluate, perplexity_estimate  # noqa: E402
from glmtg.eval.sweep import run_sweep  # noqa: E402
from glmtg.formats.mix import FILE_TYPES  # noqa: E402
from glmtg.layers.attention import BACKENDS  # noqa: E402
from glmtg.loading.presets import (  # noqa: E402
    RANDOM_WEIGHTS_SEED,
    check_file_type,
    preset_config,
    preset_tokenizer,
    random_model,
    weight_bytes,
)
from glmtg.memory import check_fits  # noqa: E402

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
DEFAULT_LAYERS = 8
DEFAULT_DEPTH = 4096
CPU_DEPTH = 256  # a CPU run is a check of the script, not a measurement: keep its prefills short
README = Path(__file__).resolve().parents[1] / "README.md"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=ModelConfig.PRESETS, default="glm-4.5-air", help="model shape")
    p.add_argument("--n-layers", type=_positive, default=None,
                   help=f"keep the first N layers (default: {DEFAULT_LAYERS}, or all of a smaller preset)")
    p.add_argument("--types", nargs="+", choices=FILE_TYPES, default=list(DEFAULT_TYPES), metavar="T",
                   help="llama.cpp file types to measure")
    p.add_argument("-f", "--file", default=str(README), help="text to evaluate")
    p.add_argument("-c", "--ctx-size", type=_positive, default=512, help="tokens per perplexity chunk")
    p.add_argument("--chunks", type=_positive, default=None, help="evaluate at most N chunks (default: all)")
    p.add_argument("--top-k", type=_positive, default=DEFAULT_TOP_K, help="base log-probs kept per token")
    p.add_argument("--depth", type=_positive, default=None,
                   help=f"second TG depth D (default: {DEFAULT_DEPTH}, on a CPU {CPU_DEPTH}; at most half the "
                        "preset's positions)")
    p.add_argument("-ub", "--ubatch", type=_positive, default=None,
                   help="prefill tokens per step of the speed run; must divide --depth (default: min(D, 2048))")
    p.add_argument("--tg", type=_positive, default=32, help="decode tokens timed per depth")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="base weights and activations")
    p.add_argument("--attn", choices=BACKENDS, default="glmtg", help="attention backend (CPU: torch fallback)")
    p.add_argument("--seed", type=int, default=RANDOM_WEIGHTS_SEED, help="random weights seed")
    p.add_argument("--out", default=None, help="output stem (default: results/quant_kld/<date>-<preset>)")
    p.add_argument("--from-json", metavar="RUN.json", default=None,
                   help="redraw RUN.md and RUN.png (or --out's) from a finished run; runs nothing")
    return p.parse_args(argv)


# ---------------------------------------------------------------- measuring

def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {text!r}")
    return device


def _free(device: torch.device) -> None:
    """Drop the last model's memory before the next is built (only one fits at Air's full width)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _param_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(elements, bytes) of the parameters as stored; a tied weight counts once (parameters() dedups)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def measure(args: argparse.Namespace, config: ModelConfig, tokens: list[int], device: torch.device,
            file_type: str | None, base: KldBase | None, n_params: int | None) -> tuple[dict[str, Any], Any]:
    """Build one model, evaluate the chunks (recording the base when ``file_type`` is None), time decode.

    Returns the row and, for the base, the recorded ``KldBase`` (and the parameter count bits/weight
    divides by); the model is freed before returning.
    """
    dtype = DTYPES[args.dtype]
    label = file_type or args.dtype
    speed_ctx = args.depth + args.ubatch
    kv = kv_cache_bytes(config, max(args.ctx_size, speed_ctx), 1, "bf16", "bf16")
    check_fits(f"{label} weights + KV cache", weight_bytes(config, dtype, file_type) + kv, device,
               "use --n-layers N to keep fewer layers")
    t0 = time.perf_counter()
    model = random_model(config, seed=args.seed, dtype=dtype, device=device, file_type=file_type)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    elements, nbytes = _param_stats(model)
    n_params = n_params or elements

    engine = Engine(model, config, EngineConfig(ctx_size=args.ctx_size, ubatch=args.ctx_size, attn_backend=args.attn),
                    device=device)
    result = evaluate(engine, tokens, args.ctx_size, n_chunks=args.chunks, base=base,
                      save_top_k=args.top_k if base is None else None, model_name=label)
    del engine
    _free(device)
    ppl, ppl_err = perplexity_estimate(result.nll)

    # decode speed: one prefill of ub tokens per row, rows at 0, ub, ..., depth (glmtg.eval.sweep)
    engine = Engine(model, config, EngineConfig(ctx_size=speed_ctx, ubatch=args.ubatch, attn_backend=args.attn),
                    device=device)
    engine.warmup(prefill_tokens=args.ubatch)
    sweep = run_sweep(engine, tg=args.tg, seed=args.seed)
    row: dict[str, Any] = {
        "type": label, "base": file_type is None, "params": n_params, "weight_bytes": nbytes,
        "bits_per_weight": 8 * nbytes / n_params, "decode_weight_bytes": model.decode_weight_bytes(),
        "ppl": ppl, "ppl_err": ppl_err, "non_finite": result.non_finite, "tokens_scored": int(result.nll.size),
        "cuda_graph": engine.uses_cuda_graph, "build_s": build_s, "eval_s": result.seconds,
        "sweep": [asdict(r) for r in sweep],
    }
    if result.kld is not None:
        row["kld"] = kld_summary(result.kld, result.same_top)
    del engine, model
    _free(device)
    return row, result.base


def run(args: argparse.Namespace, stem: Path) -> dict[str, Any]:
    device = _device(args.device)
    full = ModelConfig.preset(args.preset)
    n_layers = args.n_layers or min(DEFAULT_LAYERS, full.num_hidden_layers)
    config = preset_config(args.preset, n_layers)
    for t in args.types:  # every type checked before the first model is built
        check_file_type(config, t)
    if args.depth is None:
        args.depth = min(DEFAULT_DEPTH if device.type == "cuda" else CPU_DEPTH, config.max_position_embeddings // 2)
    if args.ubatch is None:
        args.ubatch = min(args.depth, 2048)
    if args.depth % args.ubatch:
        raise ValueError(f"-ub {args.ubatch} must divide --depth {args.depth} (the sweep's rows are ub apart)")
    if args.tg > args.ubatch:
        raise ValueError(f"--tg {args.tg} exceeds -ub {args.ubatch}: the last row's TG would not fit")
    tokens = preset_tokenizer(config).encode(Path(args.file).read_text(encoding="utf-8", errors="replace"))
    if len(tokens) < 2 * args.ctx_size:
        raise ValueError(f"{args.file} gives {len(tokens)} tokens; -c {args.ctx_size} needs at least {2 * args.ctx_size}")

    settings = {"preset": args.preset, "n_layers": n_layers, "dtype": args.dtype, "seed": args.seed,
                "text": str(args.file), "text_tokens": len(tokens), "n_ctx": args.ctx_size, "chunks": args.chunks,
                "top_k": args.top_k, "depth": args.depth, "ubatch": args.ubatch, "tg": args.tg, "attn": args.attn,
                "device": str(device), "types": list(args.types)}
    print(f"quant_kld: preset {args.preset}, {n_layers} layers, {len(tokens)} tokens of {args.file}, "
          f"-c {args.ctx_size}, device {device}", flush=True)
    rows = []
    base_row, base = measure(args, config, tokens, device, None, None, None)
    rows.append(base_row)
    print(_progress(base_row, args.depth), flush=True)
    for t in args.types:
        row, _ = measure(args, config, tokens, device, t, base, base_row["params"])
        rows.append(row)
        print(_progress(row, args.depth), flush=True)
    payload = {"tool": "bench/quant_kld.py", "environment": environment(), "settings": settings, "rows": rows}
    write_json(_at(stem, ".json"), payload)
    return payload


def _progress(row: dict[str, Any], depth: int) -> str:
    kld = row.get("kld")
    quality = f", mean KLD {kld['mean']:.3g}, top-1 {kld['same_top_pct']:.2f} %" if kld else ""
    return (f"  {row['type']:>7}: {row['bits_per_weight']:.2f} bpw, PPL {row['ppl']:.4f}{quality}, TG "
            f"{_tg(row, 0):.1f} t/s @0, {_tg(row, depth):.1f} t/s @{depth} (built {row['build_s']:.1f} s, "
            f"eval {row['eval_s']:.1f} s)")


# ---------------------------------------------------------------- reporting

def _at(stem: Path, suffix: str) -> Path:
    """STEM + suffix (not with_suffix: a preset stem such as 2026-11-28-glm-4.5-air holds a dot)."""
    return stem.parent / (stem.name + suffix)


def _tg(row: dict[str, Any], n_kv: int, key: str = "speed_tg") -> float:
    return next((r[key] for r in row["sweep"] if r["n_kv"] == n_kv), math.nan)


def table(payload: dict[str, Any]) -> str:
    env, s, rows = payload["environment"], payload["settings"], payload["rows"]
    base = next(r for r in rows if r["base"])
    d = s["depth"]
    lines = [f"# Quant mixes against {s['dtype']}: {s['preset']}, {s['n_layers']} layers (random weights, seed "
             f"{s['seed']})", "",
             f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"{env.get('date', '?')}. Text: {Path(s['text']).name}, {s['text_tokens']} tokens, chunks of "
             f"{s['n_ctx']} ({base['tokens_scored']} tokens scored), KLD over the base's top {s['top_k']} + tail. "
             f"TG: {s['tg']} tokens, batch 1, attn {s['attn']}, CUDA graph {'on' if base['cuda_graph'] else 'off'}. "
             "Random weights: PPL ~ vocabulary and small KLDs; they rank the mixes. K/IQ blocks: glmtg's quantizer, "
             "not llama-quantize's (bench/quant_kld.py).", "",
             f"| type | bits/weight | weight GB | PPL | ΔPPL % | mean KLD | KLD p99 | top-1 % | TG t/s @0 | "
             f"TG t/s @{d} | GB/s @0 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kld = r.get("kld")
        quality = (f"{kld['mean']:.3g} | {kld['p99']:.3g} | {kld['same_top_pct']:.2f}" if kld else "— | — | —")
        delta = "—" if r["base"] else f"{100 * (r['ppl'] / base['ppl'] - 1):+.3f}"
        name = f"{r['type']} (base)" if r["base"] else r["type"]
        bad = f" ({r['non_finite']} non-finite)" if r["non_finite"] else ""
        lines.append(f"| {name}{bad} | {r['bits_per_weight']:.2f} | {r['weight_bytes'] / 1e9:.3g} | {r['ppl']:.4f} | "
                     f"{delta} | {quality} | {_tg(r, 0):.1f} | {_tg(r, d):.1f} | {_tg(r, 0, 'tg_gbps'):.3g} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = payload["settings"], payload["rows"]
    quant = [r for r in rows if not r["base"]]
    fig, (ax_kld, ax_tg) = plt.subplots(1, 2, figsize=(12, 4.5))
    bpw = [r["bits_per_weight"] for r in quant]
    ax_kld.plot(bpw, [r["kld"]["mean"] for r in quant], "o", label="mean KLD")
    ax_kld.plot(bpw, [r["kld"]["p99"] for r in quant], "v", label="KLD p99")
    if all(r["kld"]["mean"] > 0 and r["kld"]["p99"] > 0 for r in quant):
        ax_kld.set_yscale("log")  # the mixes span orders of magnitude
    for r in quant:
        ax_kld.annotate(r["type"], (r["bits_per_weight"], r["kld"]["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax_kld.set_title(f"KLD against {s['dtype']} (random weights)")
    ax_kld.set_ylabel("KL divergence (nats / token)")
    for n_kv, marker in ((0, "o"), (s["depth"], "s")):
        ax_tg.plot([r["bits_per_weight"] for r in rows], [_tg(r, n_kv) for r in rows], marker, label=f"@{n_kv}")
    for r in rows:
        ax_tg.annotate(r["type"], (r["bits_per_weight"], _tg(r, 0)), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    ax_tg.set_title(f"TG, batch 1, {s['tg']} tokens")
    ax_tg.set_ylabel("tokens / s")
    ax_tg.set_ylim(bottom=0)
    for ax in (ax_kld, ax_tg):
        ax.set_xlabel("bits / weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{s['preset']}, {s['n_layers']} layers, {payload['environment'].get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(payload: dict[str, Any], stem: Path) -> None:
    md = table(payload)
    _at(stem, ".md").write_text(md, encoding="utf-8")
    print(md)
    try:
        plot(payload, _at(stem, ".png"))
        print(f"wrote {stem}.json, .md, .png")
    except ImportError:
        print(f"wrote {stem}.json, .md (no matplotlib: no PNG)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_json is not None:
            payload = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            stem = Path(args.out) if args.out else Path(args.from_json).with_suffix("")
        else:
            stem = Path(args.out) if args.out else result_path("quant_kld", args.preset)
            stem.parent.mkdir(parents=True, exist_ok=True)  # before the run: a long run must not end in a failed write
            payload = run(args, stem)
        report(payload, stem)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
