"""Decode-attention benchmark: glmtg's kernel beside torch SDPA, eager repeat-kv and FlashInfer.

On a CUDA device (the full table, JSON/MD/PNG as bench/results/decode_attention/<date>-table.*):
    python bench/decode_attention.py
Kernel tuning sweep over tile shapes and split heuristics (JSON only, <date>-tune.json):
    python bench/decode_attention.py --tune
CPU-sized smoke run through the Triton interpreter, checked against a float64 reference:
    python bench/decode_attention.py --smoke

Time: each implementation runs once per rotated KV buffer inside one CUDA graph (enough buffers
that no replay is served from the 50 MB L2), median over replays. Effective bandwidth counts the
K and V bytes that must be read (B x Hkv x ctx x D x 2 tensors x bytes/elem) over that time, and is
also given as a fraction of the measured device-to-device copy bandwidth (read + write).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import buffers_to_rotate, copy_bandwidth, environment, result_path, time_graph, write_json  # noqa: E402

from glmtg.formats import FORMATS  # noqa: E402
from glmtg.kernels.attention import cuda_loop, decode_attention, plan_launch  # noqa: E402

HEAD_CONFIGS = [(96, 8), (48, 4), (24, 2), (12, 1), (48, 2)]
CONTEXTS = [1024, 4096, 16384, 32768, 65536, 131072]
BATCHED = [(b, ctx, hq, hkv) for hq, hkv in [(96, 8), (12, 1)] for b in (8, 32) for ctx in (4096, 32768)]
EAGER_LIMIT_BYTES = 12 * 2**30  # eager's repeat_kv copies; skip where they would not fit comfortably


@dataclass
class Row:
    hq: int
    hkv: int
    batch: int
    ctx: int
    impl: str
    us: float | None
    tbps: float | None
    frac_copy: float | None
    max_abs_diff: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------- implementations
# Each maker takes one KV buffer set and returns (a zero-argument call for graph capture, a function
# giving the last output as [B, Hq, D]).

def make_ours(q, k, v, lengths, **launch_kw):
    launch = plan_launch(q.shape[0], k.shape[1], q.shape[2] // k.shape[1] * q.shape[1], q.shape[3],
                         k.shape[2], q.device, **launch_kw)
    out = torch.empty_like(q)
    return lambda: decode_attention(q, k, v, lengths, out=out, validate=False, launch=launch), lambda: out[:, 0]


QUANT_FORMATS = ("q8_0", "q4_0", "fp8")
# bytes of one token row of one head, scales included
ROW_BYTES = {name: FORMATS[name].row_bytes for name in ("bf16", *QUANT_FORMATS)}


def make_quant_set(batch, hq, hkv, ctx, d, fmt):
    """Random codes and scales in glmtg.kv_cache's planar layout (values only matter for timing)."""
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    tensors = []
    for _ in range(2):
        data_shape, data_dtype, scale_shape, scale_dtype = FORMATS[fmt].storage_shape(batch, hkv, ctx, d)
        if fmt == "fp8":
            data = torch.randn(data_shape, device="cuda").to(data_dtype)
        else:
            data = torch.randint(-127 if fmt == "q8_0" else 0, 128 if fmt == "q8_0" else 256, data_shape,
                                 device="cuda", dtype=torch.int16).to(data_dtype)
        scale = (torch.rand(scale_shape, device="cuda") * 0.02 + 0.001).to(scale_dtype)
        tensors += [data, scale]
    lengths = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, tensors[0], tensors[2], lengths, tensors[1], tensors[3]


def make_ours_quant(fmt, **variant):
    def make(q, k, v, lengths, k_scale, v_scale):
        usable = cuda_loop.usable(q, k, v, k_scale, v_scale, fmt, fmt, None)
        launch = replace(plan_launch(q.shape[0], k.shape[1], q.shape[2] // k.shape[1], q.shape[3], k.shape[2],
                                     q.device, cache_format=fmt, cuda_loop=usable), **variant)
        out = torch.empty_like(q)
        return (lambda: decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, k_format=fmt,
                                         v_format=fmt, out=out, validate=False, launch=launch),
                lambda: out[:, 0])
    return make


def make_sdpa(backend):
    def make(q, k, v, lengths):
        from torch.nn.attention import sdpa_kernel

        qt = q.transpose(1, 2)  # [B, Hq, 1, D]
        holder = {}

        def call():
            with sdpa_kernel(backend):
                holder["out"] = F.scaled_dot_product_attention(qt, k, v, enable_gqa=True)

        return call, lambda: holder["out"][:, :, 0]
    return make


def make_sdpa_default(q, k, v, lengths):
    qt = q.transpose(1, 2)
    holder = {}

    def call():
        holder["out"] = F.scaled_dot_product_attention(qt, k, v, enable_gqa=True)

    return call, lambda: holder["out"][:, :, 0]


def make_eager(q, k, v, lengths):
    """What transformers runs by default: repeat_kv, matmul, fp32 softmax, matmul."""
    group = q.shape[2] // k.shape[1]
    qt = q.transpose(1, 2)
    scale = q.shape[-1] ** -0.5
    holder = {}

    def call():
        kr = k.repeat_interleave(group, dim=1)
        vr = v.repeat_interleave(group, dim=1)
        w = torch.matmul(qt, kr.transpose(2, 3)) * scale
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        holder["out"] = torch.matmul(w, vr)

    return call, lambda: holder["out"][:, :, 0]


def make_flashinfer_single(q, k, v, lengths):
    import flashinfer

    if q.shape[0] != 1:
        raise NotImplementedError("single-request API")
    holder = {}
    q0, k0, v0 = q[0, 0], k[0], v[0]  # [Hq, D], [Hkv, N, D]

    def call():
        holder["out"] = flashinfer.single_decode_with_kv_cache(q0, k0, v0, kv_layout="HND", use_tensor_cores=True)

    return call, lambda: holder["out"][None]


def make_flashinfer_batch(q, k, v, lengths, page_size=16):
    """FlashInfer's batched paged decode, tensor-core path (its CUDA-core path rejects group 12/24),
    over its own copy of the cache in pages of 16 tokens (HND: [pages, Hkv, page_size, D])."""
    import flashinfer

    batch, _, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    pages = n // page_size

    def paged(t):
        return t.view(batch, hkv, pages, page_size, d).transpose(1, 2).reshape(batch * pages, hkv, page_size, d).contiguous()

    kp, vp = paged(k), paged(v)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND", use_tensor_cores=True)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * pages
    indices = torch.arange(batch * pages, dtype=torch.int32, device=q.device)
    last_len = torch.full((batch,), page_size, dtype=torch.int32, device=q.device)
    wrapper.plan(indptr, indices, last_len, hq, hkv, d, page_size, q_data_type=q.dtype, kv_data_type=k.dtype)
    q2 = q[:, 0]
    holder = {}

    def call():
        holder["out"] = wrapper.run(q2, (kp, vp))

    return call, lambda: holder["out"]


def peers() -> dict:
    from torch.nn.attention import SDPBackend

    return {
        "sdpa (auto)": make_sdpa_default,
        "sdpa cudnn": make_sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash": make_sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa efficient": make_sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "eager repeat-kv": make_eager,
        "flashinfer single": make_flashinfer_single,
        "flashinfer batch": make_flashinfer_batch,
    }


# ------------------------------------------------------------------------------- measurement

def kv_bytes(batch, hkv, ctx, d, elem):
    return 2 * batch * hkv * ctx * d * elem


def make_sets(batch, hq, hkv, ctx, d, dtype, nsets):
    sets = []
    for _ in range(nsets):
        q = torch.randn(batch, 1, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dtype)
        v = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dtype)
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        sets.append((q, k, v, lengths))
    return sets


def measure(impl, maker, sets, nbytes, copy_bw, reference, replays=30, **kw) -> Row:
    q = sets[0][0]
    batch, _, hq, d = q.shape
    hkv, ctx = sets[0][1].shape[1], sets[0][1].shape[2]
    try:
        calls, outputs = [], []
        for s in sets:
            call, output = maker(*s, **kw)
            calls.append(call)
            outputs.append(output)
        seconds = time_graph(calls, replays=replays)
        diff = None
        if reference is not None:  # reference: glmtg's output on the first buffer set, [B, Hq, D]
            diff = (outputs[0]().float() - reference).abs().max().item()
        bw = nbytes / seconds
        return Row(hq, hkv, batch, ctx, impl, seconds * 1e6, bw / 1e12, bw / copy_bw, diff)
    except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return Row(hq, hkv, batch, ctx, impl, None, None, None, None, msg)
    finally:
        torch.cuda.synchronize()


def run_table(args) -> None:
    env = environment()
    copy_bw = copy_bandwidth()
    env["copy_bandwidth_tbps"] = copy_bw / 1e12
    env["flashinfer"] = flashinfer_status()
    print(f"device {env['device']}, copy bandwidth {copy_bw / 1e12:.3f} TB/s, flashinfer: {env['flashinfer']}", flush=True)
    cases = [(1, ctx, hq, hkv) for hq, hkv in HEAD_CONFIGS for ctx in CONTEXTS] + BATCHED
    if args.quick:
        cases = [c for c in cases if c[1] in (4096, 65536)]
    if args.cases:  # e.g. "96/8:65536,12/1:65536" (batch 1)
        wanted = {(int(h.split("/")[0]), int(h.split("/")[1]), int(c)) for h, c in
                  (item.split(":") for item in args.cases.split(","))}
        cases = [c for c in cases if c[0] == 1 and (c[2], c[3], c[1]) in wanted]
    rows: list[Row] = []
    impls = {"glmtg": make_ours, **peers()}
    if args.formats_only:  # a short check of the cache formats beside the strongest peer only
        impls = {"glmtg": make_ours, "sdpa cudnn": impls["sdpa cudnn"]}
    for batch, ctx, hq, hkv in cases:
        d, dtype = 128, torch.bfloat16
        nbytes = kv_bytes(batch, hkv, ctx, d, 2)
        nsets = buffers_to_rotate(nbytes)
        sets = make_sets(batch, hq, hkv, ctx, d, dtype, nsets)
        q, k, v, lengths = sets[0]
        reference = decode_attention(q, k, v, lengths)[:, 0].float()
        for name, maker in impls.items():
            if name == "eager repeat-kv" and 2 * nbytes * (hq // hkv) > EAGER_LIMIT_BYTES:
                rows.append(Row(hq, hkv, batch, ctx, name, None, None, None, None, "skipped: repeat_kv copies exceed 12 GiB"))
                continue
            if name == "flashinfer single" and batch != 1:
                continue
            row = measure(name, maker, sets, nbytes, copy_bw, reference)
            rows.append(row)
            shown = f"{row.us:9.1f} us {row.tbps:5.2f} TB/s ({row.frac_copy:4.0%})" if row.us else row.note
            print(f"{hq:>3}/{hkv:<2} B={batch:<3} ctx={ctx:>6} {name:<18} {shown}", flush=True)
        del sets, q, k, v
        torch.cuda.empty_cache()
        for fmt in QUANT_FORMATS:
            qbytes = 2 * batch * hkv * ctx * ROW_BYTES[fmt](d)
            qsets = [make_quant_set(batch, hq, hkv, ctx, d, fmt) for _ in range(buffers_to_rotate(qbytes))]
            variants = [(f"glmtg {fmt}", {})]
            if args.variants:
                variants.append((f"glmtg {fmt} bf16 dot", {"fp16_dot": False}))
            for name, variant in variants:
                row = measure(name, make_ours_quant(fmt, **variant), qsets, qbytes, copy_bw, None)
                rows.append(row)
                shown = f"{row.us:9.1f} us {row.tbps:5.2f} TB/s ({row.frac_copy:4.0%})" if row.us else row.note
                print(f"{hq:>3}/{hkv:<2} B={batch:<3} ctx={ctx:>6} {name:<20} {shown}", flush=True)
            del qsets
            torch.cuda.empty_cache()
    payload = {"environment": env, "method": __doc__, "rows": [asdict(r) for r in rows],
               "accuracy": accuracy_table()}
    stem = args.out or str(result_path("decode_attention", "formats" if args.formats_only else "table"))
    write_json(Path(f"{stem}.json"), payload)  # creates the folder
    Path(f"{stem}.md").write_text(markdown_table(payload))
    plot(payload, Path(f"{stem}.png"))
    print(markdown_table(payload))


def flashinfer_status() -> str:
    try:
        import flashinfer

        return f"flashinfer {flashinfer.__version__}"
    except Exception as exc:
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"


def markdown_table(payload: dict) -> str:
    env = payload["environment"]
    all_rows = payload["rows"]
    rows = [r for r in all_rows if not r["impl"].startswith("glmtg ")]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [
        "# Decode attention, D = 128, bf16",
        "",
        f"{env.get('device')} · copy bandwidth {env.get('copy_bandwidth_tbps', 0):.2f} TB/s (read + write) · "
        f"torch {env.get('torch')} · triton {env.get('triton')} · {env.get('flashinfer')} · {env.get('date')}",
        "",
        "Each cell: µs per call (effective TB/s of K+V bytes read, fraction of copy bandwidth). "
        "CUDA-graph replays, median, KV buffers rotated past L2. — : not run (notes below).",
        "",
        "| q/kv heads | batch | ctx | " + " | ".join(impls) + " | glmtg vs best peer |",
        "|---|---|---|" + "---|" * len(impls) + "---|",
    ]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["hq"], r["hkv"], r["batch"], r["ctx"]), {})[r["impl"]] = r
    notes = {}
    for (hq, hkv, batch, ctx), by_impl in keyed.items():
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r["us"] is None:
                cells.append("—")
                if r is not None:
                    notes.setdefault((impl, r["note"]), []).append(f"{hq}/{hkv} B{batch} {ctx}")
            else:
                cells.append(f"{r['us']:.1f} ({r['tbps']:.2f}, {r['frac_copy']:.0%})")
        ours = by_impl.get("glmtg")
        peer_times = [r["us"] for i, r in by_impl.items() if i != "glmtg" and r["us"] is not None]
        speedup = f"{min(peer_times) / ours['us']:.2f}×" if ours and ours["us"] and peer_times else "—"
        lines.append(f"| {hq}/{hkv} | {batch} | {ctx // 1024}k | " + " | ".join(cells) + f" | {speedup} |")
    if notes:
        lines += ["", "Not run:", ""]
        for (impl, note), where in notes.items():
            lines.append(f"- {impl}: {note} ({len(where)} cases, e.g. {', '.join(where[:3])})")
    lines += formats_table(all_rows) + accuracy_markdown(payload.get("accuracy"))
    return "\n".join(lines) + "\n"


def formats_table(rows: list[dict]) -> list[str]:
    """glmtg over each cache format beside the best bf16 peer of the same case."""
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["hq"], r["hkv"], r["batch"], r["ctx"]), {})[r["impl"]] = r
    fmts = ["glmtg"] + [f"glmtg {f}" for f in QUANT_FORMATS]
    if not any(f"glmtg {f}" in v for v in keyed.values() for f in QUANT_FORMATS):
        return []
    lines = ["", "## Quantized KV cache (read directly by the kernel)", "",
             "µs (effective TB/s of the bytes actually read, scales included; fraction of copy bandwidth) "
             "and speed-up over the best bf16 peer of the same case.", "",
             "| q/kv heads | batch | ctx | best bf16 peer | " + " | ".join(f.replace("glmtg", "glmtg bf16") if f == "glmtg"
                                                                      else f for f in fmts) + " |",
             "|---|---|---|---|" + "---|" * len(fmts)]
    for (hq, hkv, batch, ctx), by_impl in keyed.items():
        peers_ = [(r["us"], i) for i, r in by_impl.items() if not i.startswith("glmtg") and r["us"] is not None]
        best = min(peers_) if peers_ else None
        cells = []
        for f in fmts:
            r = by_impl.get(f)
            if r is None or r["us"] is None:
                cells.append("—")
                continue
            gain = f", {best[0] / r['us']:.2f}×" if best else ""
            cells.append(f"{r['us']:.1f} ({r['tbps']:.2f}, {r['frac_copy']:.0%}{gain})")
        best_cell = f"{best[0]:.1f} ({best[1]})" if best else "—"
        lines.append(f"| {hq}/{hkv} | {batch} | {ctx // 1024}k | {best_cell} | " + " | ".join(cells) + " |")
    return lines


def gqa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence over every cached row, computed in q's dtype.

    q [B, Hq, D]; k, v [B, Hkv, T, D]; query head h reads KV head h // (Hq / Hkv). Returns [B, Hq, D].
    """
    batch, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(batch, hkv, hq // hkv, d)
    probs = torch.softmax(qg @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (probs @ v).view(batch, hq, d)


def accuracy_table(hq: int = 96, hkv: int = 8, ctx: int = 4096, d: int = 128, seed: int = 0) -> list[dict]:
    """Relative error of the attention output per cache format, against float64 attention over the
    unquantized values, on normal K/V and on K/V with a few outlier channels (x30), as real K has."""
    from glmtg.kv_cache import KVCache

    g = torch.Generator(device="cuda").manual_seed(seed)
    results = []
    for kind in ("random", "outlier channels"):
        k = torch.randn(1, ctx, hkv, d, device="cuda", generator=g)
        v = torch.randn(1, ctx, hkv, d, device="cuda", generator=g)
        if kind == "outlier channels":
            chans = torch.randperm(d, device="cuda", generator=g)[:4]
            k[..., chans] *= 30.0
            v[..., chans[:2]] *= 30.0
        q = torch.randn(1, 1, hq, d, device="cuda", generator=g)
        lengths = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        ref = gqa_reference(q[:, 0].double(), k.double().transpose(1, 2), v.double().transpose(1, 2))[:, None]
        for fmt in ("bf16", "fp8", "q8_0", "q4_0"):
            cache = KVCache(num_layers=1, batch=1, capacity=ctx, num_kv_heads=hkv, head_dim=d, k_format=fmt,
                            device="cuda")
            cache.append(0, k, v, torch.zeros(1, dtype=torch.int32, device="cuda"))
            kv, vv = cache.k(0), cache.v(0)
            out = decode_attention(q.bfloat16(), kv.data, vv.data, lengths, k_scale=kv.scale, v_scale=vv.scale,
                                   k_format=fmt, v_format=fmt)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            results.append({"data": kind, "format": fmt, "rel_error": err, "hq": hq, "hkv": hkv, "ctx": ctx})
    return results


def accuracy_markdown(acc: list[dict] | None) -> list[str]:
    if not acc:
        return []
    fmts = list(dict.fromkeys(a["format"] for a in acc))
    a0 = acc[0]
    lines = ["", f"## Accuracy per cache format ({a0['hq']}/{a0['hkv']} heads, ctx {a0['ctx']}, bf16 queries)", "",
             "Relative error ‖out − ref‖/‖ref‖ of the attention output; ref = float64 attention over the "
             "unquantized K/V. 'outlier channels': 4 K channels and 2 V channels scaled ×30.", "",
             "| K/V data | " + " | ".join(fmts) + " |", "|---|" + "---|" * len(fmts)]
    for kind in dict.fromkeys(a["data"] for a in acc):
        cells = [f"{next(a['rel_error'] for a in acc if a['data'] == kind and a['format'] == f):.2e}" for f in fmts]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["batch"] == 1 and r["tbps"] is not None]
    configs = list(dict.fromkeys((r["hq"], r["hkv"]) for r in rows))
    copy_tbps = payload["environment"].get("copy_bandwidth_tbps")
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 4), sharey=True, squeeze=False)
    for ax, (hq, hkv) in zip(axes[0], configs):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["ctx"], r["tbps"]) for r in rows if (r["hq"], r["hkv"], r["impl"]) == (hq, hkv, impl))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2.5 if impl == "glmtg" else 1,
                        label=impl)
        if copy_tbps:
            ax.axhline(copy_tbps, color="grey", ls="--", lw=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{hq}/{hkv} heads, batch 1")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective TB/s (K+V bytes / time)")
    axes[0][-1].legend(fontsize=7)
    env = payload["environment"]
    fig.suptitle(f"Decode attention, D=128 bf16 — {env.get('device')}, torch {env.get('torch')}, {env.get('date')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------- tuning sweep

TUNE_CASES = [(1, 1024, 96, 8), (1, 4096, 96, 8), (1, 65536, 96, 8), (1, 131072, 96, 8), (1, 4096, 12, 1),
              (1, 65536, 12, 1), (1, 131072, 12, 1), (1, 65536, 48, 2), (1, 32768, 24, 2), (8, 4096, 96, 8),
              (8, 32768, 12, 1)]


def run_tune(args) -> None:
    env = environment()
    copy_bw = copy_bandwidth()
    env["copy_bandwidth_tbps"] = copy_bw / 1e12
    results = []
    for batch, ctx, hq, hkv in TUNE_CASES:
        nbytes = kv_bytes(batch, hkv, ctx, 128, 2)
        sets = make_sets(batch, hq, hkv, ctx, 128, torch.bfloat16, buffers_to_rotate(nbytes))
        reference = decode_attention(*sets[0])[:, 0].float()
        variants = [dict(pdl=False)]
        for block_n, num_stages in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3)):
            variants.append(dict(block_n=block_n, num_stages=num_stages))
        for ctas in (1, 2, 3, 4):
            for min_tok in (128, 256, 512):
                variants.append(dict(ctas_per_sm=ctas, min_tokens_per_split=min_tok))
        for kw in variants:
            row = measure("glmtg", make_ours, sets, nbytes, copy_bw, reference, replays=20, **kw)
            results.append(dict(case=(batch, ctx, hq, hkv), **kw, us=row.us, tbps=row.tbps, diff=row.max_abs_diff,
                                note=row.note))
        best = sorted((r for r in results if r["case"] == (batch, ctx, hq, hkv) and r["us"]), key=lambda r: r["us"])[:5]
        for r in best:
            print(f"B={batch} ctx={ctx} {hq}/{hkv}: {r['us']:.1f} us {r['tbps']:.2f} TB/s "
                  f"{ {k: v for k, v in r.items() if k not in ('case', 'us', 'tbps', 'diff', 'note')} }", flush=True)
        del sets
        torch.cuda.empty_cache()
    write_json(Path(args.tune_out), {"environment": env, "results": results})


# ------------------------------------------------------------------------------- CPU smoke

def run_smoke() -> int:
    """Tiny shapes through the Triton interpreter, against a float64 eager computation."""
    import time

    print("decode-attention smoke run (CPU, Triton interpreter): glmtg kernel vs float64 eager reference")
    print("| q/kv heads | batch | ctx | Sq | max |err| | rel err | time s |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for hq, hkv, batch, ctx, sq in [(12, 1, 1, 100, 1), (24, 2, 2, 77, 1), (96, 8, 1, 33, 1), (10, 2, 3, 50, 3)]:
        g = torch.Generator().manual_seed(hq * ctx)
        q = torch.randn(batch, sq, hq, 64, generator=g)
        k = torch.randn(batch, hkv, ctx, 64, generator=g)
        v = torch.randn(batch, hkv, ctx, 64, generator=g)
        lengths = torch.tensor([ctx - 7 * i for i in range(batch)], dtype=torch.int32)
        t0 = time.perf_counter()
        out = decode_attention(q, k, v, lengths)
        elapsed = time.perf_counter() - t0
        ref = torch.empty(batch, sq, hq, 64, dtype=torch.float64)
        for b in range(batch):
            n = int(lengths[b])
            kk = k[b, :, :n].double().repeat_interleave(hq // hkv, 0)
            vv = v[b, :, :n].double().repeat_interleave(hq // hkv, 0)
            s = q[b].double().transpose(0, 1) @ kk.transpose(1, 2) / 8.0
            causal = torch.arange(n)[None, :] > (n - sq + torch.arange(sq))[:, None]
            s = s.masked_fill(causal, float("-inf"))
            ref[b] = (torch.softmax(s, -1) @ vv).transpose(0, 1)
        err = (out.double() - ref).abs().max().item()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, rel)
        print(f"| {hq}/{hkv} | {batch} | {ctx} | {sq} | {err:.2e} | {rel:.2e} | {elapsed:.2f} |")
    ok = worst < 1e-5
    print(f"smoke: {'PASS' if ok else 'FAIL'} (worst relative error {worst:.2e}, fp32 tolerance 1e-5)")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized run in the Triton interpreter")
    parser.add_argument("--tune", action="store_true", help="sweep tile shapes and split heuristics")
    parser.add_argument("--tune-out", default=str(result_path("decode_attention", "tune", ".json")))
    parser.add_argument("--quick", action="store_true", help="only 4k and 64k contexts")
    parser.add_argument("--formats-only", action="store_true", help="glmtg formats beside SDPA cuDNN only")
    parser.add_argument("--variants", action="store_true",
                        help="also time quantized caches with bf16 dots (DecodeLaunch.fp16_dot=False)")
    parser.add_argument("--cases", default=None, help='only these batch-1 cases, e.g. "96/8:65536,12/1:4096"')
    parser.add_argument("--out", default=None, help="path stem of the .json/.md/.png (default "
                        "bench/results/decode_attention/<date>-table, or <date>-formats with --formats-only)")
    parser.add_argument("--from-json", default=None, help="rewrite the .md and .png of an existing results JSON")
    args = parser.parse_args()
    if args.smoke:
        return run_smoke()
    if args.from_json:
        path = Path(args.from_json)
        payload = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown_table(payload))
        plot(payload, path.with_suffix(".png"))
        return 0
    if not torch.cuda.is_available():
        print("error: the full benchmark needs a CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    if args.tune:
        run_tune(args)
    else:
        run_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
