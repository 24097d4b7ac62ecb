"""GGUF products of a decode batch (a server's 2..64 sequences) on CUDA: the decode-batch kernels
(glmtg/kernels/gguf/small_batch.py: ``mmq_small`` dense, ``moe_prefill`` with small launches for the
routed experts) against the paths before them, at GLM-4.5-Air shapes, as fractions of the weight-read bound.

    python bench/small_batch.py                         # -> bench/results/small_batch/<date>-air.{json,md,png}
    python bench/small_batch.py --types q4_0,q4_k --tokens 2 8 32
    python bench/small_batch.py --from-json RUN.json    # redraw RUN.md and RUN.png

Problems (N x K): q_proj 12288 x 4096, k_proj 1024 x 4096, o_proj 4096 x 12288, shared gate_up 2816 x 4096,
shared down 4096 x 1408, lm_head 151552 x 4096 (in ``--head-type``, default q6_k as the Q4_0 / Q4_K_M mixes
keep it), and one routed-experts layer (128 experts, top 8, gate/up 1408 x 4096, down 4096 x 1408; llama.cpp's
fallback type where 1408 needs it), each token's 8 experts drawn uniformly without repeats. Kinds:

- ``new``: the decode-batch kernels (GLMTG_SMALL_BATCH=new with GLMTG_SMALL_BATCH_EXPERTS=new and
  GLMTG_SMALL_BATCH_MAX=64, set here whatever the defaults): mmq_small; QuantExperts -> moe_prefill, small
  launches (which of them runs by default: bench/DECISIONS.md J2);
- ``int8`` (q4_0 / q8_0 weights): GLMTG_SMALL_BATCH_DOT=int8's mmq_i8 / moe_i8 (int8 codes, int8
  tensor-core dots; x's rounding to int8 timed with it);
- ``old``: what ran before (GLMTG_SMALL_BATCH=old): T <= 16 the int8 GEMV (mmvq; quant_matvec for formats
  it does not read), above it dequantize to bf16 + F.linear; QuantExperts -> mmvq_moe (its per-pair decode
  kernel, which runs while a graph is captured whatever the pairs).

Time: CUDA events, median over ``--replays`` (default 30) replays of a CUDA graph holding one call per
rotated buffer set (weights, x, routing: bench/common.time_graph; enough sets that no replay hits L2).
Bound: the bytes a call must read (the weight, for the experts the union of the experts that call's routing
selects, plus x and out), over the copy bandwidth measured in the same session; "of bound" = bound time /
measured time. "rel. err" = max|y_new - y_old| / max|y_old| (old rounds x to int8 at T <= 16).
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
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph  # noqa: E402
from gguf_gemv import fit, random_blocks  # noqa: E402

from glmtg.formats import REGISTRY  # noqa: E402
from glmtg.kernels.gguf import small_batch  # noqa: E402

AIR = dict(hidden=4096, experts=128, moe_inter=1408, top_k=8, vocab=151552)
DENSE = (("q_proj", 12288, 4096), ("k_proj", 1024, 4096), ("o_proj", 4096, 12288),
         ("shared gate_up", 2816, 4096), ("shared down", 4096, 1408))
PROBLEMS = [p[0] for p in DENSE] + ["lm_head", "experts"]


def _old_dense(x: torch.Tensor, w: torch.Tensor, fmt: str, out: torch.Tensor) -> None:
    from glmtg.kernels.gguf.dequant import dequantize_rows
    from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS, quant_matvec
    from glmtg.kernels.gguf.mmvq import MMVQ_FORMATS, mmvq

    if x.shape[0] > GEMV_MAX_TOKENS:
        out.copy_(F.linear(x, dequantize_rows(w, fmt, dtype=x.dtype)))
    elif fmt in MMVQ_FORMATS:
        mmvq(x, w, fmt, out=out)
    else:
        out.copy_(quant_matvec(x, w, fmt))


def _row(kind: str, problem: str, fmt: str, tokens: int, nbytes: float, seconds: float, copy_bw: float,
         rel_err: float | None = None) -> dict:
    r = dict(kind=kind, problem=problem, fmt=fmt, tokens=tokens, us=seconds * 1e6, bytes=nbytes,
             bound_us=nbytes / copy_bw * 1e6, of_bound=nbytes / copy_bw / seconds, rel_err=rel_err)
    err = "" if rel_err is None else f"  rel.err {rel_err:.1e}"
    print(f"  {kind:<4} {problem:<15} {fmt:<11} T={tokens:<3} {r['us']:9.1f} us  bound {r['bound_us']:8.1f} us "
          f"({r['of_bound']:5.1%}){err}", flush=True)
    return r


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def bench_dense(problem: str, fmt: str, n: int, k: int, tokens: int, copy_bw: float, replays: int,
                gen: torch.Generator) -> list[dict]:
    from glmtg.kernels.gguf.mmq_i8 import I8_FORMATS, mmq_i8
    from glmtg.kernels.gguf.mmq_small import mmq_small

    f = REGISTRY[fmt]
    row_bytes = k // f.block_size * f.type_size
    nbytes = n * row_bytes + 2 * tokens * (n + k)
    sets = buffers_to_rotate(nbytes)
    ws = [random_blocks((n, row_bytes), gen) for _ in range(sets)]
    xs = [(torch.randn(tokens, k, device="cuda", generator=gen) / 16).to(torch.bfloat16) for _ in range(sets)]
    new = [torch.empty(tokens, n, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    old = [torch.empty_like(o) for o in new]
    t_old = time_graph([lambda i=i: _old_dense(xs[i], ws[i], fmt, old[i]) for i in range(sets)], replays)
    t_new = time_graph([lambda i=i: mmq_small(xs[i], ws[i], fmt, out=new[i]) for i in range(sets)], replays)
    rows = [_row("old", problem, fmt, tokens, nbytes, t_old, copy_bw),
            _row("new", problem, fmt, tokens, nbytes, t_new, copy_bw, _rel(new[0], old[0]))]
    if fmt in I8_FORMATS:  # GLMTG_SMALL_BATCH_DOT=int8's kernel, x's int8 rounding timed with it
        t_i8 = time_graph([lambda i=i: mmq_i8(xs[i], ws[i], fmt, out=new[i]) for i in range(sets)], replays)
        rows.append(_row("int8", problem, fmt, tokens, nbytes, t_i8, copy_bw, _rel(new[0], old[0])))
    return rows


def bench_experts(fmt: str, tokens: int, copy_bw: float, replays: int, gen: torch.Generator) -> list[dict]:
    from glmtg.config import ModelConfig
    from glmtg.kernels.gguf.mmq_i8 import I8_FORMATS
    from glmtg.layers.quant_experts import QuantExperts

    h, inter, e, k = AIR["hidden"], AIR["moe_inter"], AIR["experts"], AIR["top_k"]
    gu, dn = fit(fmt, h), fit(fmt, inter)
    fg, fd = REGISTRY[gu], REGISTRY[dn]
    expert_bytes = 2 * inter * (h // fg.block_size * fg.type_size) + h * (inter // fd.block_size * fd.type_size)
    sets = buffers_to_rotate(e * expert_bytes)
    layers, inputs, union = [], [], []
    for _ in range(sets):
        with torch.device("meta"):  # the stacks are the buffers below (load_expert of a whole stack: no copy)
            layer = QuantExperts(ModelConfig.preset("glm-4.5-air"), torch.bfloat16,
                                 {"gate_proj": gu, "up_proj": gu, "down_proj": dn}, backend="kernel")
        for p, shape in (("gate_proj", (e, inter, h // fg.block_size * fg.type_size)),
                         ("up_proj", (e, inter, h // fg.block_size * fg.type_size)),
                         ("down_proj", (e, h, inter // fd.block_size * fd.type_size))):
            layer.load_expert(p, None, random_blocks(shape, gen))
        x = (torch.randn(tokens, h, device="cuda", generator=gen) / 16).to(torch.bfloat16)
        ids = torch.rand(tokens, e, device="cuda", generator=gen).argsort(dim=1)[:, :k]
        wts = torch.rand(tokens, k, device="cuda", generator=gen)
        layers.append(layer)
        inputs.append((x, ids, wts))
        union.append(int(ids.unique().numel()))
    nbytes = sum(union) / sets * expert_bytes + 4 * tokens * h
    label = f"{gu}/{dn}"
    outs: dict[str, list] = {}
    rows = []
    small_batch.DOT = "float"  # "new" is the float-dot path whatever GLMTG_SMALL_BATCH_DOT says; int8 below
    small_batch.EXPERTS, small_batch.MAX_TOKENS = "new", 64  # the grouped kernels whatever the defaults
    for kind in ("old", "new"):
        small_batch.MODE = kind
        outs[kind] = [None] * sets

        def call(i: int, kind: str = kind) -> None:
            outs[kind][i] = layers[i](*inputs[i])

        seconds = time_graph([lambda i=i: call(i) for i in range(sets)], replays)
        rel = _rel(outs["new"][0], outs["old"][0]) if kind == "new" else None
        rows.append(_row(kind, "experts", label, tokens, nbytes, seconds, copy_bw, rel))
        rows[-1]["experts_read"] = sum(union) / sets
    small_batch.MODE = "new"
    if gu in I8_FORMATS and dn in I8_FORMATS:  # GLMTG_SMALL_BATCH_DOT=int8's moe_i8
        small_batch.DOT = "int8"
        outs["int8"] = [None] * sets

        def call_i8(i: int) -> None:
            outs["int8"][i] = layers[i](*inputs[i])

        seconds = time_graph([lambda i=i: call_i8(i) for i in range(sets)], replays)
        small_batch.DOT = "float"
        rows.append(_row("int8", "experts", label, tokens, nbytes, seconds, copy_bw,
                         _rel(outs["int8"][0], outs["old"][0])))
        rows[-1]["experts_read"] = sum(union) / sets
    return rows


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# GGUF decode-batch products: {env.get('device')}", "",
             (f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. "
              f"GLM-4.5-Air shapes, bf16 x. Copy bandwidth {payload['copy_bw'] / 1e12:.2f} TB/s. bound = bytes "
              "read (weights; experts: the union the routing selects) / copy bandwidth; 'of bound' = bound / time. "
              "new = mmq_small / moe_prefill (small launches), old = mmvq (T <= 16) or dequantize + F.linear, "
              "mmvq_moe for the experts."), "",
             ("| problem | type | T | old µs | new µs | int8 µs | bound µs | old of bound | new of bound | "
              "int8 of bound | speed-up | rel. err |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = payload["rows"]
    for r in (r for r in rows if r["kind"] == "new"):
        o, i8 = (next((q for q in rows if q["kind"] == kind and q["problem"] == r["problem"]
                       and q["fmt"] == r["fmt"] and q["tokens"] == r["tokens"]), None) for kind in ("old", "int8"))
        old_us = "" if o is None else f"{o['us']:.1f}"
        old_frac = "" if o is None else f"{o['of_bound']:.0%}"
        speed = "" if o is None else f"{o['us'] / r['us']:.2f}x"
        err = "" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        i8_us = "" if i8 is None else f"{i8['us']:.1f}"
        i8_frac = "" if i8 is None else f"{i8['of_bound']:.0%}"
        lines.append(f"| {r['problem']} | {r['fmt']} | {r['tokens']} | {old_us} | {r['us']:.1f} | {i8_us} | "
                     f"{r['bound_us']:.1f} | {old_frac} | {r['of_bound']:.0%} | {i8_frac} | {speed} | {err} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    problems = [p for p in PROBLEMS if any(r["problem"] == p for r in rows)]
    cols = min(4, len(problems))
    fig, axes = plt.subplots(-(-len(problems) // cols), cols, figsize=(3.6 * cols, 3.0 * -(-len(problems) // cols)),
                             squeeze=False)
    for ax, prob in zip(axes.flat, problems):
        for (kind, fmt), style in zip(sorted({(r["kind"], r["fmt"]) for r in rows if r["problem"] == prob}),
                                      ["o-", "s--", "^-", "v--", "D-", "x--"] * 4):
            pts = sorted((r["tokens"], r["of_bound"]) for r in rows
                         if r["problem"] == prob and r["kind"] == kind and r["fmt"] == fmt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{kind} {fmt}", ms=4)
        ax.axhline(0.8, color="grey", lw=1, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_title(prob, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(problems):]:
        ax.axis("off")
    axes[0][0].set_ylabel("weight-read bound / time")
    fig.suptitle(f"GGUF decode-batch products, GLM-4.5-Air shapes — {payload['environment'].get('device')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_reports(payload: dict, stem: Path) -> None:
    common.write_reports(payload, stem, markdown, plot)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="q4_0", help="GGUF types of the dense and expert weights, comma-separated")
    parser.add_argument("--head-type", default="q6_k", help="GGUF type of the lm_head")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="tokens per call")
    parser.add_argument("--problems", default=",".join(PROBLEMS), help=f"some of {PROBLEMS}, comma-separated")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default "
                        "bench/results/small_batch/<date>-air)")
    parser.add_argument("--from-json", type=Path, default=None, help="redraw the .md and .png of a results JSON")
    args = parser.parse_args()
    if args.from_json is not None:
        write_reports(json.loads(args.from_json.read_text()), args.out or args.from_json.with_suffix(""))
        return 0
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    if any(t not in small_batch.FORMATS for t in types + [args.head_type]):
        parser.error(f"--types and --head-type must be some of {small_batch.FORMATS}")
    if not problems or set(problems) - set(PROBLEMS):
        parser.error(f"--problems must be some of {PROBLEMS}, got {args.problems!r}")
    if any(t < 1 or t > 512 for t in args.tokens):
        parser.error("every --tokens value must be in 1..512")
    if not torch.cuda.is_available():
        print("error: bench/small_batch.py times CUDA kernels and needs a CUDA device (their correctness tests "
              "run on a CPU: tests/kernels/gguf/test_mmq_small.py, tests/layers/test_small_batch.py)",
              file=sys.stderr)
        return 2
    copy_bw = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    for t in args.tokens:
        for fmt in types:
            for name, n, k in DENSE:
                if name in problems:
                    rows += bench_dense(name, fit(fmt, k), n, k, t, copy_bw, args.replays, gen)
            if "experts" in problems:
                rows += bench_experts(fmt, t, copy_bw, args.replays, gen)
        if "lm_head" in problems:
            rows += bench_dense("lm_head", args.head_type, AIR["vocab"], AIR["hidden"], t, copy_bw, args.replays, gen)
        torch.cuda.empty_cache()
    payload = dict(environment=environment(), copy_bw=copy_bw, rows=rows,
                   switches=dict(mode=small_batch.MODE, min_tokens=small_batch.MIN_TOKENS,
                                 max_tokens=small_batch.MAX_TOKENS))
    write_reports(payload, args.out or result_path("small_batch", "air"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
