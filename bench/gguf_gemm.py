"""GGUF prefill GEMMs on CUDA: the dequantizing tensor-core kernels (glmtg/kernels/gguf/mmq.py, mmq_moe.py)
against the path they replace and against bf16 weights, at GLM-4.5-Air prefill shapes.

    python bench/gguf_gemm.py                          # -> bench/results/gguf_gemm/<date>-prefill.{json,md,png}
    python bench/gguf_gemm.py --types q4_k --tokens 4096
    python bench/gguf_gemm.py --sweep --types q4_0     # also a grid of launch configs of the dense kernel
    python bench/gguf_gemm.py --from-json RUN.json     # redraw RUN.md and RUN.png

Per GGUF type (default Q4_0, Q4_K, Q5_0, Q8_0) and tokens T (default 512, 2048, 4096), three problems:
q_proj (N x K = 12288 x 4096), o_proj (4096 x 12288) and the routed experts (128 experts, top 8, gate/up
1408 x 4096, down 4096 x 1408; down in llama.cpp's fallback type where 1408 is no multiple of the
type's block, e.g. Q4_K -> Q5_0). Each is timed three ways:

- ``mmq``: glmtg's kernels (``mmq`` / ``moe_prefill``: tiles dequantized in registers into tl.dot);
- ``dequant``: the path before them: ``dequantize_rows`` to bf16 + ``F.linear`` (dense), and for the
  experts ``QuantExperts`` with ``gemm = "dequant"`` (each expert with pairs dequantized, three matmuls; it
  reads the per-expert counts on the host, so it runs eagerly);
- ``bf16``: the same shapes with bf16 weights: cuBLAS ``F.linear`` (dense) and the sync-free grouped GEMM
  of the bf16 experts (``glmtg.layers.moe.grouped_experts``: ``torch._grouped_mm`` on sm90) + the fp32
  combine. Its rate is the "dense bf16 rate" each row is compared with ("of bf16").

TFLOP/s counts 2·T·N·K for a dense product and 6·T·k·H·I for the experts (gate, up, down of every pair).
Time: CUDA events, the median over ``--replays`` (default 20) replays of a CUDA graph of one call
(bench/common.time_graph; eagerly for the host-syncing expert loop). Weights: random bytes with bit 6 of
every byte cleared (finite fp16 scales; speed does not depend on the values); x = randn / 16 in bf16.
Routing: each token's 8 experts drawn uniformly without repeats. "rel. err" = max|y - y_dequant| /
max|y_dequant| of the kernel against the old path on the same inputs (both round the weights to bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import environment, result_path, time_graph  # noqa: E402
from gguf_gemv import fit, random_blocks  # noqa: E402

from glmtg.formats import REGISTRY  # noqa: E402

DEFAULT_TYPES = ("q4_0", "q4_k", "q5_0", "q8_0")
AIR = dict(hidden=4096, q_rows=12288, experts=128, moe_inter=1408, top_k=8)
DENSE = (("q_proj", AIR["q_rows"], AIR["hidden"]), ("o_proj", AIR["hidden"], AIR["q_rows"]))
SWEEP = [  # block_m, block_n, block_k (values; rounded up to one block), num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 64, 256, 8, 2), (64, 64, 256, 4, 2),
]


def _time(fn, replays: int, graph: bool = True) -> float:
    return time_graph([fn], replays, use_graph=graph)


def _row(kind: str, problem: str, fmt: str, tokens: int, flops: float, seconds: float, config: str = "default",
         rel_err: float | None = None) -> dict:
    r = dict(kind=kind, problem=problem, fmt=fmt, tokens=tokens, config=config, us=seconds * 1e6,
             tflops=flops / seconds / 1e12, rel_err=rel_err)
    err = "" if rel_err is None else f"  rel.err {rel_err:.1e}"
    print(f"  {kind:<8} {problem:<8} {fmt:<11} T={tokens:<5} {config:<18} {r['us']:10.1f} us "
          f"{r['tflops']:7.1f} TFLOP/s{err}", flush=True)
    return r


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def bench_dense_bf16(tokens: int, replays: int, gen: torch.Generator) -> list[dict]:
    rows = []
    for name, n, k in DENSE:
        x = torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) / 16).to(torch.bfloat16)
        rows.append(_row("bf16", name, "bf16", tokens, 2 * tokens * n * k, _time(lambda: F.linear(x, w), replays)))
    return rows


def bench_dense(fmt: str, tokens: int, replays: int, gen: torch.Generator, sweep: bool) -> list[dict]:
    from glmtg.kernels.gguf.dequant import dequantize_rows
    from glmtg.kernels.gguf.mmq import MmqConfig, mmq

    rows = []
    for name, n, k in DENSE:
        used = fit(fmt, k)
        f = REGISTRY[used]
        w = random_blocks((n, k // f.block_size * f.type_size), gen)
        x = (torch.randn(tokens, k, device="cuda", generator=gen) / 16).to(torch.bfloat16)
        out = torch.empty(tokens, n, dtype=torch.bfloat16, device="cuda")
        flops = 2 * tokens * n * k
        ref = F.linear(x, dequantize_rows(w, used, dtype=torch.bfloat16))
        rows.append(_row("dequant", name, used, tokens, flops,
                         _time(lambda: F.linear(x, dequantize_rows(w, used, dtype=torch.bfloat16)), replays)))
        configs = [None] + (SWEEP if sweep else [])
        for cfg in configs:
            config = None if cfg is None else MmqConfig(cfg[0], cfg[1], max(cfg[2], f.block_size), cfg[3], cfg[4])
            label = "default" if cfg is None else "/".join(map(str, (config.block_m, config.block_n, config.block_k,
                                                                     config.num_warps, config.num_stages)))
            try:
                seconds = _time(lambda: mmq(x, w, used, out=out, config=config), replays)
            except Exception as exc:  # one launch the GPU cannot take (shared memory) must not end the sweep
                print(f"  mmq {name} {used} T={tokens} {label}: failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            rows.append(_row("mmq", name, used, tokens, flops, seconds, label, _rel(out, ref)))
    return rows


def _routing(tokens: int, gen: torch.Generator) -> torch.Tensor:
    e, k = AIR["experts"], AIR["top_k"]
    return torch.rand(tokens, e, device="cuda", generator=gen).argsort(dim=1)[:, :k]


def bench_experts(fmt: str, tokens: int, replays: int, gen: torch.Generator) -> list[dict]:
    from glmtg.config import ModelConfig
    from glmtg.kernels.gguf.mmq_moe import moe_prefill
    from glmtg.layers.quant_experts import QuantExperts

    h, inter, e, k = AIR["hidden"], AIR["moe_inter"], AIR["experts"], AIR["top_k"]
    gu, dn = fit(fmt, h), fit(fmt, inter)
    fg, fd = REGISTRY[gu], REGISTRY[dn]
    gate = random_blocks((e, inter, h // fg.block_size * fg.type_size), gen)
    up = random_blocks((e, inter, h // fg.block_size * fg.type_size), gen)
    down = random_blocks((e, h, inter // fd.block_size * fd.type_size), gen)
    x = (torch.randn(tokens, h, device="cuda", generator=gen) / 16).to(torch.bfloat16)
    ids = _routing(tokens, gen)
    wts = torch.rand(tokens, k, device="cuda", generator=gen)
    flops = 6 * tokens * k * h * inter
    with torch.device("meta"):  # the stacks are then the buffers above (load_expert of a whole stack: no copy)
        layer = QuantExperts(ModelConfig.preset("glm-4.5-air"), torch.bfloat16,
                             {"gate_proj": gu, "up_proj": gu, "down_proj": dn}, backend="kernel")
    for p, v in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        layer.load_expert(p, None, v)
    layer.gemm = "dequant"
    ref = layer(x, ids, wts)
    label = f"{gu}/{dn}"
    rows = [_row("dequant", "experts", label, tokens, flops, _time(lambda: layer(x, ids, wts), replays, graph=False))]
    out = torch.empty_like(x)
    seconds = _time(lambda: moe_prefill(x, gate, up, down, ids, wts, gu, dn, out=out), replays)
    rows.append(_row("mmq", "experts", label, tokens, flops, seconds, rel_err=_rel(out, ref)))
    return rows


def bench_experts_bf16(tokens: int, replays: int, gen: torch.Generator) -> list[dict]:
    from glmtg.layers.moe import grouped_experts

    h, inter, e, k = AIR["hidden"], AIR["moe_inter"], AIR["experts"], AIR["top_k"]
    gate = (torch.randn(e, inter, h, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    up = (torch.randn(e, inter, h, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    down = (torch.randn(e, h, inter, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    x = torch.randn(tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
    ids = _routing(tokens, gen)
    wts = torch.rand(tokens, k, device="cuda", generator=gen)

    def run() -> torch.Tensor:  # as glmtg.layers.moe.Experts.forward for many pairs
        return (grouped_experts(x, gate, up, down, ids).float() * wts[..., None]).sum(1).to(x.dtype)

    return [_row("bf16", "experts", "bf16", tokens, 6 * tokens * k * h * inter, _time(run, replays))]


def attach_fractions(rows: list[dict]) -> None:
    """Each row's TFLOP/s over the bf16 row of the same problem and tokens ("of bf16")."""
    dense = {(r["problem"], r["tokens"]): r["tflops"] for r in rows if r["kind"] == "bf16"}
    for r in rows:
        base = dense.get((r["problem"], r["tokens"]))
        r["of_bf16"] = None if base is None else r["tflops"] / base


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# GGUF prefill GEMMs: {env.get('device')}", "",
             (f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. "
              "GLM-4.5-Air shapes; TFLOP/s = useful FLOP / time; 'of bf16' = that over the bf16-weight rate of "
              "the same problem (cuBLAS / torch grouped GEMM). mmq = dequantizing tensor-core kernels, dequant = "
              "dequantize to bf16 + matmul (the path before)."), "",
             "| kind | problem | type | T | config | µs | TFLOP/s | of bf16 | rel. err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        frac = "" if r.get("of_bf16") is None else f"{r['of_bf16']:.0%}"
        err = "" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {r['kind']} | {r['problem']} | {r['fmt']} | {r['tokens']} | {r['config']} | "
                     f"{r['us']:.1f} | {r['tflops']:.1f} | {frac} | {err} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["config"] == "default" and r["kind"] != "bf16"]
    problems = sorted({r["problem"] for r in rows}, key=["q_proj", "o_proj", "experts"].index)
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.6), squeeze=False)
    for ax, prob in zip(axes[0], problems):
        for (kind, fmt), style in zip(sorted({(r["kind"], r["fmt"]) for r in rows if r["problem"] == prob}),
                                      ["o-", "s--", "^-", "v--", "D-", "x--", "P-", "*--"] * 4):
            pts = sorted((r["tokens"], r["of_bf16"] or 0) for r in rows
                         if r["problem"] == prob and r["kind"] == kind and r["fmt"] == fmt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{kind} {fmt}", ms=4)
        ax.axhline(1.0, color="grey", lw=1, ls=":")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_title(prob, fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("TFLOP/s / bf16-weight TFLOP/s")
    fig.suptitle(f"GGUF prefill GEMMs, GLM-4.5-Air shapes — {payload['environment'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_reports(payload: dict, stem: Path) -> None:
    common.write_reports(payload, stem, markdown, plot)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="GGUF types, comma-separated")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096], help="tokens per call")
    parser.add_argument("--problems", default="dense,experts", help="dense, experts or both")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of dense launch configs")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default "
                        "bench/results/gguf_gemm/<date>-prefill, or -sweep)")
    parser.add_argument("--from-json", type=Path, default=None, help="redraw the .md and .png of a results JSON")
    args = parser.parse_args()
    if args.from_json is not None:
        write_reports(json.loads(args.from_json.read_text()), args.out or args.from_json.with_suffix(""))
        return 0
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    problems = {p.strip() for p in args.problems.split(",") if p.strip()}
    if any(t not in REGISTRY or REGISTRY[t].dequantize_blocks is None for t in types):
        parser.error(f"--types must be GGUF types of glmtg.formats, got {types}")
    if not problems or problems - {"dense", "experts"}:
        parser.error(f"--problems must be dense, experts or both, got {args.problems!r}")
    if any(t < 1 for t in args.tokens):
        parser.error("every --tokens value must be >= 1")
    if not torch.cuda.is_available():
        print("error: bench/gguf_gemm.py times CUDA kernels and needs a CUDA device (their correctness tests run "
              "on a CPU: tests/kernels/gguf/test_mmq*.py)", file=sys.stderr)
        return 2
    from glmtg.kernels.gguf.decode import DECODED

    skipped = sorted({t for t in types if t not in DECODED})
    types = [t for t in types if t in DECODED]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    for t in args.tokens:
        if "dense" in problems:
            rows += bench_dense_bf16(t, args.replays, gen)
        if "experts" in problems:
            rows += bench_experts_bf16(t, args.replays, gen)
        for fmt in types:
            if "dense" in problems:
                rows += bench_dense(fmt, t, args.replays, gen, args.sweep)
            if "experts" in problems:
                rows += bench_experts(fmt, t, args.replays, gen)
            torch.cuda.empty_cache()
    attach_fractions(rows)
    payload = dict(environment=environment(), rows=rows, skipped=skipped, shapes=AIR)
    write_reports(payload, args.out or result_path("gguf_gemm", "sweep" if args.sweep else "prefill"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
