"""GGUF decode kernels on CUDA: quant_matvec (dense GEMV) and quant_moe_decode (routed experts), weights read
in their block formats in place, per GGUF type, at the GLM-4.5-Air and GLM-4.5 decode shapes.

    python bench/gguf_gemv.py                               # -> bench/results/gguf_gemv/<date>-kernels.{json,md,png}
    python bench/gguf_gemv.py --types q4_k,q8_0 --tokens 1 4
    python bench/gguf_gemv.py --sweep                       # also a grid of launch configs (<date>-sweep.*)
    python bench/gguf_gemv.py --from-json RUN.json          # redraw RUN.md and RUN.png
    python bench/gguf_gemv.py --sass --types q5_0,q8_0      # CPU: sm_90 machine code per weight value
    python bench/gguf_gemv.py --mmvq [--sass]               # also the int8-dot kernels (mmvq.py), side by side
    python bench/gguf_gemv.py --mmvq --mmvq-only --mmvq-variants base,lanes,lanes-wide --types q6_k,q4_k \
        --models air --kernels gemv --shapes lm_head,o_proj,q_proj,k_proj   # mmvq's variants side by side
    python bench/gguf_gemv.py --mmvq --mmvq-only --models air --types q4_0,q4_k,q8_0 --shared-expert \
        --mmvq-variants base,lanes,lanes-q4,lanes-q4-narrow,lanes-q4-wide \
        --moe-variants base,lanes,lanes-narrow,lanes-wide        # every T = 1 variant, dense and experts

Shapes (hidden H, per model): q/k/v projections 12288/1024/1024 x H, o_proj H x 12288, dense gate/up
intermediate x H and down H x intermediate, lm_head 151552 x H; routed experts E x (gate, up: I x H; down:
H x I), top 8. A type whose block does not divide a row (K-quants at K = 10944 or I = 1408) is replaced by
llama.cpp's fallback for that tensor (q4_k -> q5_0, q6_k -> q8_0, iq4_xs -> iq4_nl ...), as a quantized file
holds it; the row names the type timed. Types with no device decoder yet are listed and skipped.

Weights: random bytes with bit 6 of every byte cleared, which keeps every fp16 scale finite (exponent < 16)
and leaves the codes varied; speed does not depend on the values. Each timed call reads another weight
buffer (rotated so that at least 150 MB lie between two reads of one, bench/common.py), or for the MoE,
another routing set (16 sets, at T = 1 cycling over every expert), so no read is served from the 50 MB L2.

Time: the calls captured back to back in one CUDA graph and replayed (common.time_graph), median per call.
"TB/s" = weight bytes a call must read / time ("of copy": over the measured device copy rate, read + write).
Each row also gives max|y - ref| / max|ref| against dequantize_rows + an fp32 matmul (same decoders: a
check of the kernels' plumbing, not of the decoders).

--sass (no GPU needed): compiles each kernel for sm_90 at its default blocks and counts the SASS
instructions of its innermost loop per weight value. A streaming kernel cannot beat the SM's issue rate
(4 warp instructions per clock = 128 lanes), so bytes per value / instructions per value x 128 x SMs x
clock is an upper bound on its TB/s (--sms, --clock-ghz; H100 SXM: 132, 1.98). A decoder far above
~6 instructions per 4-bit value cannot reach 85% of an H100's copy rate, whatever the launch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph  # noqa: E402

from glmtg.formats import REGISTRY  # noqa: E402

DEFAULT_TYPES = ("q4_k", "q5_0", "q6_k", "iq4_xs", "q8_0")
# llama.cpp's type for a tensor whose rows are no whole number of the target's 256-value blocks.
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0", "iq4_xs": "iq4_nl",
            "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
            "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl"}
MODELS = {  # hidden, dense intermediate, experts, moe intermediate, top-k
    "air": dict(name="GLM-4.5-Air", hidden=4096, inter=10944, experts=128, moe_inter=1408, top_k=8),
    "glm45": dict(name="GLM-4.5", hidden=5120, inter=12288, experts=160, moe_inter=1536, top_k=8),
}
ROUTING_SETS = 16
VOCAB = 151552
GEMV_SWEEP = [  # (block_n, values_per_step, num_warps)
    (1, 512, 4), (2, 512, 4), (4, 512, 4), (8, 512, 4), (16, 512, 8), (4, 256, 4), (8, 256, 4), (4, 1024, 4),
    (8, 1024, 8), (2, 1024, 4),
]
# --mmvq --sweep: the int8-dot kernels work on one block per thread, so their grid is in blocks per step
# (block_n x values_per_step / block size) against threads (32 x num_warps).
MMVQ_SWEEP = [(1, 4096, 4), (2, 2048, 4), (4, 1024, 4), (1, 2048, 2), (2, 1024, 2), (1, 1024, 1), (1, 8192, 8),
              (2, 4096, 8), (8, 4096, 4), (4, 4096, 4), (16, 4096, 8), (2, 4096, 1), (4, 4096, 2)]
# --mmvq --sweep, the lanes variants (mmvq_lanes.py: a block on 4-16 lanes): more blocks a step per warp
# (independent loads in flight), several rows a program, up to a whole Air row a step.
MMVQ_LANES_SWEEP = [(1, 512, 1), (1, 2048, 1), (1, 4096, 1), (2, 1024, 1), (1, 2048, 2), (1, 4096, 2),
                    (2, 2048, 2), (4, 1024, 2), (1, 4096, 4), (4, 4096, 4)]
MMVQ_MOE_SWEEP = [(1, 4096, 1, 4096, 4), (2, 2048, 2, 2048, 4), (4, 1024, 4, 1024, 4), (1, 2048, 1, 2048, 2),
                  (1, 1024, 1, 1024, 1), (8, 4096, 8, 4096, 4), (4, 4096, 4, 4096, 4),
                  (32, 512, 1, 4096, 4), (32, 4096, 8, 4096, 8), (32, 1024, 2, 2048, 4)]  # block_i 32: fused
# --mmvq --sweep, mmvq_moe's lanes variants (mmvq_moe_lanes.py; 32-value blocks: 1024 values = 32 blocks a
# gate/up step, 128 = 4 a down step, a divisor of Air's 44-block rows): more blocks a step, more rows a
# program, more warps, and down steps that leave a partial one (512 values: 16 + 16 + 12 blocks)
MMVQ_MOE_LANES_SWEEP = [(1, 512, 4, 128, 1), (1, 2048, 4, 128, 1), (1, 4096, 4, 128, 1), (2, 1024, 8, 128, 2),
                        (4, 1024, 16, 128, 4), (1, 1024, 2, 128, 1), (1, 1024, 8, 128, 1), (1, 1024, 1, 512, 1),
                        (1, 1024, 8, 64, 1), (2, 2048, 8, 128, 2), (1, 1024, 4, 128, 2)]
MOE_SWEEP = [  # (block_i, values_per_step, block_h, values_per_step_down, num_warps)
    (8, 512, 8, 512, 4), (4, 512, 4, 512, 4), (16, 256, 16, 256, 4), (8, 256, 8, 256, 4), (16, 512, 8, 512, 8),
    (4, 1024, 8, 512, 4), (2, 1024, 4, 1024, 4),
]


def fit(name: str, k: int) -> str:
    """The type a GGUF file holds for rows of ``k`` values when ``name`` is asked (llama.cpp's fallback)."""
    if k % REGISTRY[name].block_size == 0:
        return name
    name = FALLBACK.get(name, "f16")
    return name if k % REGISTRY[name].block_size == 0 else "f16"


def gemv_shapes(m: dict) -> list[tuple[str, int, int]]:
    h = m["hidden"]
    return [("q_proj", 12288, h), ("k_proj", 1024, h), ("v_proj", 1024, h), ("o_proj", h, 12288),
            ("dense gate/up", m["inter"], h), ("dense down", h, m["inter"]), ("lm_head", VOCAB, h)]


def random_blocks(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """uint8 bytes with bit 6 cleared: every fp16 field then has an exponent below 16 (finite, < 2)."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=gen) & 0xBF


def bench_gemv(fmt: str, label: str, n: int, k: int, tokens: int, copy_bw: float, configs: list, replays: int,
               gen: torch.Generator, with_mmvq: bool = False, mmvq_only: bool = False,
               variants: tuple[str, ...] = ("base",)) -> list[dict]:
    from glmtg.kernels.gguf.dequant import dequantize_rows
    from glmtg.kernels.gguf.gemv import quant_matvec

    f = REGISTRY[fmt]
    nbytes = n * (k // f.block_size) * f.type_size
    sets = buffers_to_rotate(nbytes)
    ws = [random_blocks((n, nbytes // n), gen) for _ in range(sets)]
    xs = [torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(sets)]
    outs = [torch.empty(tokens, n, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    ref = xs[0].float() @ dequantize_rows(ws[0], fmt).T
    rows = []
    kernels = [] if mmvq_only else [("gemv", quant_matvec)]
    if with_mmvq:  # --mmvq: the int8-dot kernel side by side, same configs; each of --mmvq-variants
        from functools import partial

        from glmtg.kernels.gguf.mmvq import MMVQ_FORMATS, mmvq
        from glmtg.kernels.gguf.mmvq_lanes import lanes_split
        from glmtg.kernels.gguf.mmvq_lanes32 import lanes32_split
        for v in variants:  # a variant that would run the base kernel here is not timed twice, nor "lanes-q4*"
            # on Q6_K / Q4_K (there the "lanes" kernel)
            if fmt in MMVQ_FORMATS and (v == "base" or lanes32_split(v, fmt, tokens, k // f.block_size)
                                        or (lanes_split(v, fmt, tokens) and not v.startswith("lanes-q4"))):
                kernels.append(("mmvq" if v == "base" else f"mmvq-{v}", partial(mmvq, variant=v)))
    swept = len(configs) > 1
    sweep = {"gemv": configs, "mmvq": [None] + (MMVQ_SWEEP if swept else []),
             **{kind: [None] + (MMVQ_LANES_SWEEP if swept else []) for kind, _ in kernels if kind.startswith("mmvq-")}}
    for (kind, fn), cfg in ((kf, c) for kf in kernels for c in sweep[kf[0]]):
        kw = {} if cfg is None else dict(zip(("block_n", "values_per_step", "num_warps"), cfg, strict=True))
        calls = [lambda i=i, kw=kw, fn=fn: fn(xs[i], ws[i], fmt, out=outs[i], **kw) for i in range(sets)]
        name = "default" if cfg is None else "/".join(map(str, cfg))
        try:
            seconds = time_graph(calls, replays)
        except Exception as exc:  # one bad launch config should not end the sweep
            print(f"  {label} {fmt} T={tokens} {name}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        calls[0]()
        err = float((outs[0].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        rows.append(dict(kind=kind, tensor=label, fmt=fmt, n=n, k=k, tokens=tokens, config=name,
                         us=seconds * 1e6, mb=nbytes / 1e6, tbps=nbytes / seconds / 1e12,
                         frac_copy=nbytes / seconds / copy_bw, rel_err=err))
        print_row(rows[-1])
    return rows


def routing_sets(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """As bench/moe_decode.py: at T = 1 consecutive sets are disjoint and together cover all experts."""
    perm = torch.randperm(experts, device="cuda", generator=gen)
    sets = []
    for s in range(ROUTING_SETS):
        if tokens == 1 and ROUTING_SETS * top_k <= experts:
            ids = perm[s * top_k:(s + 1) * top_k][None]
        else:
            ids = torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:top_k] for _ in range(tokens)])
        sets.append(ids)
    return sets


def bench_moe(fmt: str, m: dict, tokens: int, copy_bw: float, configs: list, replays: int,
              gen: torch.Generator, with_mmvq: bool = False, moe_variants: tuple[str, ...] = ("base",),
              shared: bool = False, mmvq_only: bool = False) -> list[dict]:
    from glmtg.kernels.gguf.dequant import dequantize_rows
    from glmtg.kernels.gguf.moe import quant_moe_decode

    h, inter, e, top_k = m["hidden"], m["moe_inter"], m["experts"], m["top_k"]
    gu, dn = fit(fmt, h), fit(fmt, inter)
    fgu, fd = REGISTRY[gu], REGISTRY[dn]
    rb_h, rb_i = h // fgu.block_size * fgu.type_size, inter // fd.block_size * fd.type_size
    gate, up = random_blocks((e, inter, rb_h), gen), random_blocks((e, inter, rb_h), gen)
    down = random_blocks((e, h, rb_i), gen)
    id_sets = routing_sets(tokens, e, top_k, gen)
    xs = [torch.randn(tokens, h, device="cuda", generator=gen).to(torch.bfloat16) for _ in id_sets]
    wts = [torch.rand(tokens, top_k, device="cuda", generator=gen) for _ in id_sets]
    outs = [torch.empty_like(x) for x in xs]
    expert_bytes = 2 * inter * rb_h + h * rb_i
    distinct = sum(int(ids.unique().numel()) for ids in id_sets) / len(id_sets)
    nbytes = (distinct + shared) * expert_bytes
    # --shared-expert: a shared expert as one more slot (mmvq_moe's ``shared``), as the model runs it; 4 of
    # them rotated (a layer's shared expert is not in L2 either)
    sh_sets = [(random_blocks((inter, rb_h), gen), random_blocks((inter, rb_h), gen), random_blocks((h, rb_i), gen))
               for _ in range(4 if shared else 0)]
    ref = _moe_reference(xs[0], gate, up, down, id_sets[0], wts[0], gu, dn, dequantize_rows,
                         sh_sets[0] if shared else None)
    rows = []
    names = ("block_i", "values_per_step", "block_h", "values_per_step_down", "num_warps")
    kernels = [] if mmvq_only or shared else [("moe", quant_moe_decode)]  # the float kernel has no shared slot
    if with_mmvq:  # --mmvq: the int8-dot kernels side by side, same configs; each of --moe-variants
        from functools import partial

        from glmtg.kernels.gguf.mmvq import MMVQ_FORMATS
        from glmtg.kernels.gguf.mmvq_moe import mmvq_moe
        from glmtg.kernels.gguf.mmvq_moe_lanes import lanes_for
        for v in moe_variants if gu in MMVQ_FORMATS and dn in MMVQ_FORMATS else ():
            # a lanes variant that would run the base kernels for both launches here is not timed twice
            if v == "base" or lanes_for(v, gu, h // fgu.block_size, tokens) or lanes_for(v, dn, inter // fd.block_size,
                                                                                         tokens):
                kernels.append(("mmvq-moe" if v == "base" else f"mmvq-moe-{v}", partial(mmvq_moe, variant=v)))
    swept = len(configs) > 1
    sweep = {"moe": configs, "mmvq-moe": [None] + (MMVQ_MOE_SWEEP if swept else []),
             **{kind: [None] + (MMVQ_MOE_LANES_SWEEP if swept else []) for kind, _ in kernels
                if kind.startswith("mmvq-moe-")}}
    for (kind, fn), cfg in ((kf, c) for kf in kernels for c in sweep[kf[0]]):
        kw = {} if cfg is None else dict(zip(names, cfg, strict=True))
        calls = [lambda i=i, kw=kw, fn=fn: fn(xs[i], gate, up, down, id_sets[i], wts[i], gu, dn, out=outs[i],
                                              **{**kw, **({"shared": sh_sets[i % 4]} if shared else {})})
                 for i in range(len(id_sets))]
        name = "default" if cfg is None else "/".join(map(str, cfg))
        try:
            seconds = time_graph(calls, replays)
        except Exception as exc:
            print(f"  moe {m['name']} {gu}/{dn} T={tokens} {name}: failed: {type(exc).__name__}: {str(exc)[:160]}",
                  flush=True)
            continue
        calls[0]()
        err = float((outs[0].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        rows.append(dict(kind=kind, tensor=f"{m['name']} experts" + (" + shared" if shared else ""), fmt=f"{gu}/{dn}",
                         n=e, k=inter, tokens=tokens,
                         config=name, us=seconds * 1e6, mb=nbytes / 1e6, tbps=nbytes / seconds / 1e12,
                         frac_copy=nbytes / seconds / copy_bw, rel_err=err))
        print_row(rows[-1])
    return rows


def _moe_reference(x, gate, up, down, ids, wts, gu, dn, dequantize_rows, shared=None) -> torch.Tensor:
    """fp32 torch of the same formula over the dequantized experts a token chose (+ the shared expert)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        xt = x[t].float()
        mats = [(gate[int(e)], up[int(e)], down[int(e)], float(w)) for e, w in zip(ids[t], wts[t])]
        for g, u, d, w in mats + ([(*shared, 1.0)] if shared is not None else []):
            h = torch.nn.functional.silu(dequantize_rows(g, gu) @ xt) * (dequantize_rows(u, gu) @ xt)
            y[t] += w * (dequantize_rows(d, dn) @ h)
    return y


def print_row(r: dict) -> None:
    print(f"  {r['kind']:<10} {r['tensor']:<20} {r['fmt']:<14} T={r['tokens']:<2} {r['config']:<16} "
          f"{r['us']:9.1f} us {r['tbps']:6.2f} TB/s ({r['frac_copy']:4.0%} of copy)  rel.err {r['rel_err']:.1e}",
          flush=True)


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# GGUF decode kernels: {env.get('device')}, copy {payload['copy_tbps']:.2f} TB/s", "",
             (f"torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}. "
              "TB/s = weight bytes read / time; 'of copy' = that over the device copy rate."), "",
             "| kernel | tensor | type | N x K | T | config | MB | µs | TB/s | of copy | rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['kind']} | {r['tensor']} | {r['fmt']} | {r['n']} x {r['k']} | {r['tokens']} | "
                     f"{r['config']} | {r['mb']:.1f} | {r['us']:.1f} | {r['tbps']:.2f} | {r['frac_copy']:.0%} | "
                     f"{r['rel_err']:.1e} |")
    if payload.get("skipped"):
        lines += ["", "Skipped (no device decoder yet): " + ", ".join(payload["skipped"])]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["config"] == "default"]
    labels = [f"{r['kind']} {r['tensor']} {r['fmt']} T{r['tokens']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows) + 1)))
    ax.barh(range(len(rows)), [r["frac_copy"] for r in rows], color=["C1" if "moe" in r["kind"] else "C0"
                                                                     for r in rows])
    ax.axvline(0.85, color="grey", ls="--", lw=1, label="85% of copy")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("effective bandwidth / copy bandwidth (default launch)")
    ax.legend(fontsize=7)
    ax.set_title(f"GGUF GEMV (blue) and MoE (orange) — {payload['environment'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_reports(payload: dict, stem: Path) -> None:
    common.write_reports(payload, stem, markdown, plot)


def _mmvq_sass_cases(name: str, xdt: str, g: int) -> list[tuple]:
    """--sass --mmvq: the int8-dot kernel (glmtg/kernels/gguf/mmvq.py) of ``name`` at its default launch
    at 4 warps for rows of 4096 values, as sass_report's cases (``tiles`` rescales sass_report's G to the kernel's)."""
    from glmtg.kernels.gguf import mmvq, mmvq_lanes, mmvq_lanes32, mmvq_moe, mmvq_moe_lanes

    if name not in mmvq.MMVQ_FORMATS:
        return []
    f = REGISTRY[name]
    steps = min(4096 // f.block_size, 128)  # default_config's blocks at 4 warps (sass_report counts 128 threads)
    block_n = 128 // steps
    words = dict(XW="i32", DX="fp32", XS="i32", W="u8", Y=xdt, Bias=xdt, Res=xdt)
    gate_up = dict(XW="i32", DX="fp32", XS="i32", Gate="u8", Up="u8", Ids="i64", Weights="fp32", Act="fp32",
                   AQ="i8", ADX="fp32", AS="i32", SGate="u8", SUp="u8")
    down = dict(AW="i32", ADX="fp32", AS="i32", Down="u8", Ids="i64", Y=xdt, SDown="u8")
    moe = dict(BLOCK_R=block_n, G=steps)
    return [("mmvq", mmvq._mmvq_kernel, words, dict(BLOCK_T=1, BLOCK_N=block_n, G=steps, HAS_BIAS=False, HAS_RES=False),
             block_n, steps / g,
             f"block_n {block_n}, G {steps}"),
            ("mmvq-moe gate/up", mmvq_moe._gate_up_kernel, gate_up, {**moe, "FUSED": False}, block_n, 2 * steps / g,
             f"block_i {block_n}"),
            ("mmvq-moe down", mmvq_moe._down_kernel, down, moe, block_n, steps / g, f"block_h {block_n}")] + [
        # the lanes variants (mmvq_lanes.py): as many blocks a step as fill 4 warps
        (f"mmvq-{v}", mmvq_lanes._lanes_kernel, words,
         dict(BLOCK_N=1, G=(gl := 128 // mmvq_lanes.lanes_per_block(name, e)), HAS_BIAS=False, HAS_RES=False, E=e),
         1, gl / g, f"block_n 1, G {gl}")
        for v, e in (("lanes", 1), ("lanes-wide", 2)) if name in mmvq_lanes.LANES_FORMATS] + [
        # the 32-value lanes variants (mmvq_lanes32.py) at their default launch (2 rows x 4096 values)
        (f"mmvq-{v}", mmvq_lanes32._lanes32_kernel, words,
         dict(BLOCK_N=2, G=128, HAS_BIAS=False, HAS_RES=False, L=split), 2, 128 / g, "block_n 2, G 128")
        for v, split in mmvq_lanes32.LANES32_VARIANTS.items() if name in mmvq_lanes32.LANES32_FORMATS and split] + [
        # the routed-expert lanes kernels (mmvq_moe_lanes.py) at their default launch (one warp; ``tiles``
        # rescales to sass_report's 4 warps: the values a thread takes in one iteration of the innermost loop,
        # gate/up: one step of both matrices; down: a whole row of a slot, Air's I = 1408, GLM-4.5's 1536 for q4_k)
        (f"mmvq-moe-{v} {part}", kernel, ptrs,
         dict(GPB=f.block_size // 32, BLOCK_R=cfg[0], G=cfg[1], L=lanes, SHARED=1, _warps=cfg[2], **const), cfg[0],
         per_iter * 4 / g, f"{cfg[0]} rows, G {cfg[1]}, {cfg[2]} warp")
        for v in ("lanes", "lanes-narrow", "lanes-wide") if name in mmvq_moe_lanes.MOE_LANES_FORMATS
        for nb in [(1536 if name == "q4_k" else 1408) // f.block_size]
        for lanes in [mmvq_moe_lanes.lanes_for(v, name, 2, 1)]
        for part, kernel, ptrs, cfg, const in (
            ("gate/up", mmvq_moe_lanes._gate_up_lanes_kernel,
             {k: w for k, w in gate_up.items() if k not in ("AQ", "ADX", "AS")},
             mmvq_moe_lanes.default_config(name, lanes, nb, False), {}),
            ("down", mmvq_moe_lanes._down_lanes_kernel, {k: w for k, w in down.items() if k != "SDown"},
             mmvq_moe_lanes.default_config(name, lanes, nb, True), dict(NB=nb)))
        for per_iter in [2 * cfg[1] if part == "gate/up" else nb]]


def sass_report(types: list[str], sms: int, clock_ghz: float, x_dtype: str, with_mmvq: bool = False) -> int:
    """Print, per type and kernel, the sm_90 SASS of the innermost loop: instructions per weight value and
    the issue-rate bound on TB/s (see the module docstring)."""
    import inspect
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from glmtg.kernels.gguf import gemv, moe
    from glmtg.kernels.gguf.decode import DECODED

    tool = Path(get_ptxas(90).path).parent / "cuobjdump"

    def compile_loop(kernel, ptrs: dict, const: dict, num_warps: int) -> int:
        sig, attrs = {}, {}
        params = inspect.signature(kernel.fn).parameters
        const = {k: v for k, v in const.items() if k in params}  # e.g. the lanes kernel takes no BS
        for i, name in enumerate(params):
            sig[name] = "constexpr" if name in const else ("*" + ptrs[name] if name in ptrs else "i32")
            if sig[name] != "constexpr" and name not in ("T", "N", "NUM_EXPERTS", "TOPK"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as a real launch specializes them
        c = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        ops = [(int(m.group(1), 16), m.group(2)) for m in
               re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+[^;]*);", sass)]
        back = [(a - int(t.group(1), 16), a) for a, op in ops if op.startswith("BRA")
                and (t := re.search(r"0x([0-9a-f]+)", op)) and int(t.group(1), 16) < a]
        span, end = min(back)  # the innermost loop: the shortest backward branch
        loop = [op for a, op in ops if end - span <= a <= end]
        return len(loop), sum(1 for op in loop if op.startswith("LDG"))

    xdt = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[x_dtype]
    print(f"issue bound: 128 lanes/clock x {sms} SMs x {clock_ghz} GHz; x in {xdt}")
    print("| kernel | type | config | instr / value | global loads / value | bytes / value | bound TB/s |")
    print("|---|---|---|---|---|---|---|")
    for name in types:
        if name not in DECODED:
            print(f"| - | {name} | no device decoder yet | | | | |")
            continue
        f = REGISTRY[name]
        g = gemv.steps_for(f.block_size, 512)
        fmt = dict(FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, G=g)
        cases = [("gemv", gemv._gemv_kernel, dict(X=xdt, W="u8", Y=xdt, Aux="fp32"), dict(BLOCK_T=1, BLOCK_N=bn),
                  bn, 1, f"block_n {bn}") for bn in (4, 8)]
        cases += [("moe gate/up", moe._gate_up_kernel, dict(X=xdt, Gate="u8", Up="u8", Ids="i64", Weights="fp32",
                                                            Act="fp32", Aux="fp32"), dict(BLOCK_R=8), 8, 2, "block_i 8"),
                  ("moe down", moe._down_kernel, dict(Act="fp32", Down="u8", Ids="i64", Y=xdt, Aux="fp32"),
                   dict(BLOCK_R=8), 8, 1, "block_h 8")]
        if with_mmvq:
            cases += _mmvq_sass_cases(name, xdt, g)
        for kname, kernel, ptrs, extra, rows, tiles, cfg in cases:
            try:
                const = {**fmt, **extra}
                body, loads = compile_loop(kernel, ptrs, const, const.pop("_warps", 4))
            except Exception as exc:  # report and go on
                print(f"| {kname} | {name} | compile failed: {type(exc).__name__}: {str(exc)[:120]} | | | | |")
                continue
            values = tiles * rows * g * f.block_size / 128  # a thread's values an iteration (128 threads at 4 warps)
            per_value = body / values
            bpv = f.type_size / f.block_size
            bound = bpv / per_value * 128 * sms * clock_ghz * 1e9 / 1e12
            print(f"| {kname} | {name} | {cfg}, {round(tiles * g) * f.block_size} values a step | {per_value:.2f} | "
                  f"{loads / values:.3f} | {bpv:.3f} | {bound:.2f} |", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="GGUF types, comma-separated")
    parser.add_argument("--models", default="air,glm45", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1], help="tokens per call (<= 16)")
    parser.add_argument("--kernels", default="gemv,moe", help="gemv, moe or both")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configs")
    parser.add_argument("--shapes", default="", help="GEMV shapes to time, comma-separated labels (q_proj, "
                        "k_proj, v_proj, o_proj, dense gate/up, dense down, lm_head; default all)")
    parser.add_argument("--mmvq-only", action="store_true", help="with --mmvq: time the int8-dot kernels alone")
    parser.add_argument("--mmvq-variants", default="base", help="with --mmvq: mmvq's kernel variants to time "
                        "side by side, comma-separated (base, lanes, lanes-wide: glmtg/kernels/gguf/mmvq_lanes.py; the "
                        "lanes variants run q6_k / q4_k at one token, rows labelled mmvq-<variant>)")
    parser.add_argument("--moe-variants", default="base", help="with --mmvq: mmvq_moe's kernel variants to time "
                        "side by side, comma-separated (base, lanes, lanes-narrow, lanes-wide: "
                        "glmtg/kernels/gguf/mmvq_moe_lanes.py; rows labelled mmvq-moe-<variant>)")
    parser.add_argument("--shared-expert", action="store_true", help="the MoE rows fold a shared expert in as one "
                        "more slot (as GLM runs it: 8 routed + 1 shared; its bytes counted); int8 kernels only")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default "
                        "bench/results/gguf_gemv/<date>-kernels, <date>-sweep with --sweep)")
    parser.add_argument("--from-json", type=Path, default=None, help="redraw the .md and .png of a results JSON")
    parser.add_argument("--sass", action="store_true", help="no GPU: count sm_90 instructions per weight value")
    parser.add_argument("--sms", type=int, default=132, help="--sass: SMs of the target (H100 SXM: 132)")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="--sass: SM clock (H100 SXM boost: 1.98)")
    parser.add_argument("--mmvq", action="store_true", help="also the int8-dot kernels (gguf/mmvq.py, mmvq_moe.py): timed "
                        "next to the float ones; with --sass, counted")
    parser.add_argument("--x-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="--sass: dtype of x")
    args = parser.parse_args()
    if args.from_json is not None:
        write_reports(json.loads(args.from_json.read_text()), args.from_json.with_suffix(""))
        return 0
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(t not in REGISTRY or REGISTRY[t].dequantize_blocks is None for t in types):
        parser.error(f"--types must be GGUF types of glmtg.formats, got {types}")
    if any(m not in MODELS for m in models):
        parser.error(f"--models must be of {sorted(MODELS)}, got {models}")
    if any(not 1 <= t <= 16 for t in args.tokens):
        parser.error("every --tokens value must be 1 ... 16")
    from glmtg.kernels.gguf.mmvq_lanes import VARIANTS
    variants = tuple(v.strip() for v in args.mmvq_variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--mmvq-variants must be of {VARIANTS}, got {args.mmvq_variants!r}")
    from glmtg.kernels.gguf.mmvq_moe_lanes import VARIANTS as MOE_VARIANTS
    moe_variants = tuple(v.strip() for v in args.moe_variants.split(",") if v.strip())
    if not moe_variants or any(v not in MOE_VARIANTS for v in moe_variants):
        parser.error(f"--moe-variants must be of {MOE_VARIANTS}, got {args.moe_variants!r}")
    if args.sass:
        return sass_report(types, args.sms, args.clock_ghz, args.x_dtype, args.mmvq)
    if not torch.cuda.is_available():
        print("error: bench/gguf_gemv.py times CUDA kernels and needs a CUDA device (their correctness tests "
              "run on a CPU: tests/kernels/gguf/)", file=sys.stderr)
        return 2
    from glmtg.kernels.gguf.decode import DECODED

    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, skipped, done = [], set(), set()
    kernels = set(args.kernels.split(","))
    for key in models:
        m = MODELS[key]
        for t in args.tokens:
            for fmt in types:
                if "gemv" in kernels:
                    for label, n, k in gemv_shapes(m):
                        if args.shapes and label not in args.shapes.split(","):
                            continue
                        used = fit(fmt, k)
                        if used not in DECODED:
                            skipped.add(used)
                            continue
                        if (key, t, label, used) in done:  # a fallback type also asked for itself
                            continue
                        done.add((key, t, label, used))
                        configs = [None] + (GEMV_SWEEP if args.sweep else [])
                        rows += bench_gemv(used, f"{m['name']} {label}", n, k, t, copy_bw, configs, args.replays, gen,
                                           args.mmvq, args.mmvq_only, variants)
                if "moe" in kernels:
                    if fit(fmt, m["hidden"]) not in DECODED or fit(fmt, m["moe_inter"]) not in DECODED:
                        skipped.update({fit(fmt, m["hidden"]), fit(fmt, m["moe_inter"])} - set(DECODED))
                        continue
                    configs = [None] + (MOE_SWEEP if args.sweep else [])
                    rows += bench_moe(fmt, m, t, copy_bw, configs, args.replays, gen, args.mmvq, moe_variants,
                                      args.shared_expert, args.mmvq_only)
                torch.cuda.empty_cache()
    payload = dict(environment=environment(), copy_tbps=copy_bw / 1e12, rows=rows, skipped=sorted(skipped),
                   models={k: MODELS[k] for k in models}, routing_sets=ROUTING_SETS)
    write_reports(payload, args.out or result_path("gguf_gemv", "sweep" if args.sweep else "kernels"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
