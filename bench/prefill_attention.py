"""Prefill-attention benchmark: glmtg's causal chunk kernel beside torch SDPA, at GLM shapes (96/8, D = 128).

On a CUDA device (JSON/MD/PNG as bench/results/prefill_attention/<date>-table.*), in about 2-3 minutes:
    python bench/prefill_attention.py
Redraw the table and chart of an earlier run (any machine):
    python bench/prefill_attention.py --from-json RUN.json

Cases: a chunk of 512, 2048 or 4096 new tokens over a cached prefix of 0, 16k, 32k or 64k tokens (batch 1).
Implementations:
- "glmtg <fmt>": glmtg.kernels.attention.prefill_attention over a bf16, q8_0, q4_0 or fp8 cache, read in its
  stored format (what attend's "glmtg" backend runs for a prefill chunk).
- "sdpa flash bf16", "sdpa cudnn bf16": torch SDPA on a bf16 cache with GQA, lower-right causal mask (the
  chunk's queries at the end of the context). Flash as torch's flash op called directly (its is_causal is
  lower-right, as torch.nn.attention.bias.causal_lower_right uses it); cuDNN through SDPA with is_causal at
  prefix 0 and a boolean mask otherwise. Where a backend refuses GQA, K/V are repeated to 96 heads
  beforehand (untimed) and the row says so; a backend that refuses a case outright is noted, not fatal.
- "old path <fmt>": attend(backend="sdpa") on the same KVCache, which is what the "glmtg" backend ran for
  prefill before: the cache dequantized to a bf16 copy (KVCache.dequantized) and SDPA with a boolean mask,
  dequantization included in the time. It reads lengths on the host, so it is timed without a CUDA graph.

Time: each call captured in a CUDA graph (the old path: called directly) and replayed; the median over
replays, each timed with CUDA events. No input rotation: prefill is compute-bound and each K/V tile is
reused by every row tile anyway. FLOPs are the causal attention's exactly: query token t (at position
prefix + t) sees prefix + t + 1 keys, so 4 * D * Hq * (S * prefix + S (S + 1) / 2) (QK^T and PV, 2 per
multiply-add). "Of peak" divides TFLOP/s by the dense bf16 tensor-core rate measured in the same run by
torch.matmul of two 8192 x 8192 bf16 matrices. "err" is each row's relative error (Frobenius norm) against
SDPA (default dispatch) over the same cache dequantized to bf16 (KVCache.whole), computed once, untimed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, time_graph, write_json  # noqa: E402

HQ, HKV, D = 96, 8, 128
CHUNKS = (512, 2048, 4096)
PREFIXES = (0, 16384, 32768, 65536)
FORMATS = ("bf16", "q8_0", "q4_0", "fp8")
# --variants: other launches of glmtg's kernel beside the planned one (plan_prefill's keywords)
VARIANTS = {"decode step": dict(fa2_step=False), "block_n 128": dict(block_n=128), "stages 2": dict(num_stages=2),
            "stages 4": dict(num_stages=4), "block_m 64": dict(block_m=64, num_warps=4),
            "bf16 dots": dict(fp16_dot=False)}


def causal_flops(s: int, prefix: int, hq: int = HQ, d: int = D) -> int:
    """Multiply and add of QK^T and PV over the keys each query may see (exactly, no masked tiles)."""
    return 4 * d * hq * (s * prefix + s * (s + 1) // 2)


def matmul_peak(n: int = 8192, replays: int = 20) -> float:
    """Dense bf16 tensor-core rate in FLOP/s: median time of an n x n x n torch.matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    seconds = time_graph([lambda: torch.matmul(a, b, out=c)], replays=replays)
    return 2 * n ** 3 / seconds


def make_cache(fmt: str, prefix: int, s: int, seed: int):
    from glmtg.kv_cache import KVCache

    n = prefix + s
    cache = KVCache(num_layers=1, batch=1, capacity=n, num_kv_heads=HKV, head_dim=D, k_format=fmt, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    for lo in range(0, n, 16384):  # append in pieces: fp32 K/V of a 68k context would take 0.6 GB at once
        hi = min(n, lo + 16384)
        k = torch.randn(1, hi - lo, HKV, D, device="cuda", generator=g)
        v = torch.randn(1, hi - lo, HKV, D, device="cuda", generator=g)
        cache.append(0, k, v, torch.full((1,), lo, dtype=torch.int32, device="cuda"))
    cache.lengths.fill_(n)
    return cache


def make_glmtg(q, cache, **variant):
    from glmtg.kernels.attention import plan_prefill, prefill_attention

    kv, vv = cache.k(0), cache.v(0)
    out = torch.empty_like(q)
    launch = plan_prefill(D, q.device, **variant)

    def call():
        prefill_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale,
                          k_format=kv.format, v_format=vv.format, out=out, validate=False, launch=launch)
    return call, out


def make_sdpa(backend: str, q, cache, expand: bool = False):
    """SDPA on the bf16 cache's K/V [1, Hkv, n, D] with GQA (``expand``: K/V repeated to Hq heads beforehand,
    outside the timing, for a backend that refuses GQA); the output is [1, Hq, S, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(1, 2).contiguous()  # [1, Hq, S, D]
    k, v = cache.k(0).data, cache.v(0).data
    if expand:
        k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
    s, n = qt.shape[2], k.shape[2]
    box = {}
    if backend == "flash":
        # torch's flash op itself (what causal_lower_right dispatches to when flash can run), called directly so
        # that the row is flash or nothing: its is_causal aligns the mask lower-right (the queries end the context)
        def call():
            box["out"] = torch.ops.aten._scaled_dot_product_flash_attention(
                qt, k, v, 0.0, is_causal=True, return_debug_mask=False, scale=D ** -0.5)[0]
        return call, box
    if s == n:
        which, kwargs = SDPBackend.CUDNN_ATTENTION, dict(is_causal=True)
    else:
        mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - s, n, device=q.device)[:, None]
        which, kwargs = SDPBackend.CUDNN_ATTENTION, dict(attn_mask=mask)

    def call():
        with sdpa_kernel([which]):
            box["out"] = F.scaled_dot_product_attention(qt, k, v, enable_gqa=not expand, **kwargs)
    return call, box


def make_old_path(q, cache):
    from glmtg.layers.attention import attend

    box = {}

    def call():
        box["out"] = attend(q, cache, 0, cache.lengths, "sdpa", D ** -0.5, static_shapes=False)
    return call, box


def reference(q, cache) -> torch.Tensor:
    """SDPA (default backend choice) over the cache dequantized to bf16, lower-right causal: [1, S, Hq, D]."""
    from torch.nn.attention.bias import causal_lower_right

    k, v = cache.whole(0, torch.bfloat16)  # [1, Hkv, n, D]
    qt = q.transpose(1, 2)
    mask = causal_lower_right(qt.shape[2], k.shape[2])
    try:
        out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, enable_gqa=True)
    except RuntimeError:  # a torch whose causal-bias dispatch takes no GQA
        out = F.scaled_dot_product_attention(qt, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1),
                                             attn_mask=mask)
    return out.transpose(1, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(name: str, make, replays: int, graph: bool) -> tuple[float | None, str, object]:
    """(seconds, note, output holder) of one implementation; a refusal or OOM gives (None, why, None)."""
    try:
        call, holder = make()
        seconds = time_graph([call], replays=replays, use_graph=graph)
        return seconds, "", holder
    except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        torch.cuda.empty_cache()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", None


def run(args) -> dict:
    env = environment()
    peak = matmul_peak()
    env["bf16_matmul_tflops"] = peak / 1e12
    print(f"device {env['device']}, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for s in args.chunks:
        for prefix in args.prefixes:
            flops = causal_flops(s, prefix)
            q = torch.randn(1, s, HQ, D, device="cuda", dtype=torch.bfloat16)
            for fmt in args.formats:
                cache = make_cache(fmt, prefix, s, seed=prefix + s)
                impls = [(f"glmtg {fmt}", lambda: make_glmtg(q, cache), True, None)]
                if args.variants:
                    impls += [(f"glmtg {fmt} [{name}]", lambda kw=kw: make_glmtg(q, cache, **kw), True, None)
                              for name, kw in VARIANTS.items() if fmt != "bf16" or name != "bf16 dots"]
                if fmt == "bf16":
                    for backend in ("flash", "cudnn"):
                        impls.append((f"sdpa {backend} bf16", lambda b=backend: make_sdpa(b, q, cache), True,
                                      lambda b=backend: make_sdpa(b, q, cache, expand=True)))
                # attend's SDPA with a boolean mask and GQA runs torch's math fallback, which materialises the
                # fp32 scores [Hq, S, n]: skipped where they would pass the limit (OOM, or seconds per call).
                old_ok = 4 * HQ * s * (prefix + s) <= args.old_path_limit_gib * 2**30
                if not args.no_old_path:
                    impls.append((f"old path {fmt}", lambda: make_old_path(q, cache), False, None))
                outs = {}
                for name, make, graph, fallback in impls:
                    old = name.startswith("old path")
                    if old and not old_ok:
                        seconds, note, holder = None, f"skipped: fp32 scores over {args.old_path_limit_gib} GiB", None
                    else:
                        seconds, note, holder = measure(name, make, min(args.replays, 3) if old else args.replays,
                                                        graph)
                    if seconds is None and fallback is not None:
                        refused = note
                        seconds, note, holder = measure(name, fallback, args.replays, graph)
                        note = f"K/V expanded to {HQ} heads (GQA refused: {refused})" if seconds else note
                    if holder is not None:
                        out = holder if isinstance(holder, torch.Tensor) else holder.get("out")
                        outs[name] = out.transpose(1, 2) if name.startswith("sdpa") else out  # -> [1, S, Hq, D]
                    row = dict(chunk=s, prefix=prefix, fmt=fmt, impl=name,
                               ms=None if seconds is None else seconds * 1e3,
                               tflops=None if seconds is None else flops / seconds / 1e12, flops=flops, note=note)
                    row["frac_peak"] = None if seconds is None else flops / seconds / peak
                    rows.append(row)
                    shown = note if seconds is None else \
                        f"{row['ms']:8.2f} ms {row['tflops']:6.1f} TFLOP/s ({row['frac_peak']:4.0%}) {note}"
                    print(f"S={s:<5} prefix={prefix:<6} {name:<18} {shown}", flush=True)
                if outs:
                    ref = reference(q, cache)
                    for row in rows[-len(impls):]:
                        if row["impl"] in outs:
                            row["err"] = rel_err(outs[row["impl"]], ref)
                    del ref
                cache = outs = None  # free them before the next case (the lambdas above are done)
                torch.cuda.empty_cache()
            q = None
    return {"environment": env, "method": __doc__, "rows": rows}


def markdown(payload: dict) -> str:
    env = payload["environment"]
    rows = payload["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"# Prefill attention, {HQ}/{HKV} heads, D = {D}, batch 1",
             "", f"{env.get('device')}, {env.get('date')}; torch {env.get('torch')}, triton {env.get('triton')}; "
             f"dense bf16 matmul peak {env.get('bf16_matmul_tflops', float('nan')):.0f} TFLOP/s (measured, this run).",
             "", "TFLOP/s (fraction of that peak); causal FLOPs counted exactly.", "",
             "| chunk | prefix | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    cases = list(dict.fromkeys((r["chunk"], r["prefix"]) for r in rows))
    by = {(r["chunk"], r["prefix"], r["impl"]): r for r in rows}
    for s, prefix in cases:
        cells = []
        for impl in impls:
            r = by.get((s, prefix, impl))
            cells.append("" if r is None else "n/a" if r["tflops"] is None
                         else f"{r['tflops']:.0f} ({r['frac_peak']:.0%})")
        lines.append(f"| {s} | {prefix} | " + " | ".join(cells) + " |")
    lines += ["", "Milliseconds per call, and the relative error against SDPA over the same cache dequantized "
              "to bf16:", "",
              "| chunk | prefix | impl | ms | err |", "|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['err']:.1e}" if r.get("err") is not None else ""
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else "n/a"
        lines.append(f"| {r['chunk']} | {r['prefix']} | {r['impl']} | {ms} | {err} |")
    notes = [f"- {r['impl']} at S={r['chunk']}, prefix {r['prefix']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Notes (skipped, refused, or run another way):", *notes]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    chunks = sorted({r["chunk"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows if "[" not in r["impl"]))  # --variants: table only
    fig, axes = plt.subplots(1, len(chunks), figsize=(4.5 * len(chunks), 4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], chunks):
        for i, impl in enumerate(impls):
            pts = sorted((r["prefix"], r["frac_peak"]) for r in rows
                         if r["chunk"] == s and r["impl"] == impl and r["frac_peak"] is not None)
            if pts:
                style = "-" if impl.startswith("glmtg") else "--" if impl.startswith("sdpa") else ":"
                ax.plot([p / 1024 for p, _ in pts], [f for _, f in pts], style, marker="o", ms=3, label=impl,
                        color=f"C{i % 10}")
        ax.set_title(f"chunk {s}", fontsize=9)
        ax.set_xlabel("cached prefix (k tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of measured bf16 matmul peak")
    axes[0][-1].legend(fontsize=6)
    env = payload["environment"]
    fig.suptitle(f"Prefill attention {HQ}/{HKV}, D={D} — {env.get('device')}, "
                 f"peak {env.get('bf16_matmul_tflops', float('nan')):.0f} TFLOP/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_reports(payload: dict, stem: Path) -> None:
    write_json(Path(f"{stem}.json"), payload)  # creates the folder
    Path(f"{stem}.md").write_text(markdown(payload))
    try:
        plot(payload, Path(f"{stem}.png"))
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {stem}.json / .md / .png")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=_ints, default=CHUNKS, help="new tokens per chunk (default: %(default)s)")
    parser.add_argument("--prefixes", type=_ints, default=PREFIXES, help="cached tokens before the chunk "
                        "(default: %(default)s)")
    parser.add_argument("--formats", type=lambda t: tuple(t.split(",")), default=FORMATS,
                        help=f"KV-cache formats, from {','.join(FORMATS)} (default: all)")
    parser.add_argument("--replays", type=int, default=10, help="timed replays per call (default: %(default)s)")
    parser.add_argument("--no-old-path", action="store_true", help="skip the dequantize + SDPA rows")
    parser.add_argument("--variants", action="store_true",
                        help=f"also time glmtg's kernel with other launches: {', '.join(VARIANTS)}")
    parser.add_argument("--old-path-limit-gib", type=float, default=16.0,
                        help="skip old-path rows whose fp32 score matrix would exceed this (default: %(default)s)")
    parser.add_argument("--out", help="output path stem (default: results/prefill_attention/<date>-table)")
    parser.add_argument("--from-json", metavar="RUN.json", help="redraw RUN.md and RUN.png from a run's JSON")
    args = parser.parse_args()
    if args.from_json:
        path = Path(args.from_json)
        payload = json.loads(path.read_text())
        write_reports(payload, path.with_suffix(""))
        return 0
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or args.replays < 1 or 0 in args.chunks:
        print(f"error: formats must be among {FORMATS}, chunks >= 1 and replays >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench/prefill_attention.py times CUDA kernels and needs a CUDA device (the kernel's "
              "correctness tests run on a CPU: tests/kernels/attention/test_prefill.py)", file=sys.stderr)
        return 2
    payload = run(args)
    write_reports(payload, Path(args.out) if args.out else result_path("prefill_attention", "table"))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
