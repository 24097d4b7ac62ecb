"""How many kernels one decode step launches, and where: the CUDA-graph step time beside every launch of
the model's forward, counted by kernel name, and torch's kernels grouped by the module that launched them.

At batch 1 a decode step is a chain of a few hundred launches; each costs a CUDA-graph node (about 1 µs on a
Hopper GPU) plus its own ramp, so the launch count bounds the step time from below as much as the weight
bytes do. The step runs eagerly under torch.profiler for the counts and, separately, replayed from a CUDA
graph for the time. Modules are labelled by forward hooks (``record_function``); torch's kernels count
toward the innermost label that launched them. Triton launches are not correlated with ops by the
profiler: they appear in the by-name count only.

    python bench/step_profile.py --preset glm-4.5-air --n-layers 8 --type Q4_0
    python bench/step_profile.py --type Q4_K_M --depth 65536 -ctk q8_0 --glue off

Writes ``results/step_profile/<date>-<preset>-<n>l-<type>-<depth>-<glue>.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

# Module classes whose forward gets its own label, by the attribute path's last part.
LABELLED = ("attn_norm", "qkv", "o_proj", "attn", "mlp_norm", "router", "experts", "shared", "mlp", "norm",
            "lm_head", "embed")


def _label_hooks(model: torch.nn.Module) -> list:
    handles = []
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        if last not in LABELLED:
            continue
        label = "layers.*." + name.split(".", 2)[2] if name.startswith("layers.") else name

        def pre(_m, _a, label=label):
            ctx = torch.profiler.record_function("glmtg:" + label)
            ctx.__enter__()
            _m._profile_ctx = ctx

        def post(_m, _a, _o):
            _m._profile_ctx.__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _kernel_table(prof, steps: int) -> tuple[list[dict], int]:
    """torch's kernel time and launches per step by innermost glmtg label; every launch by kernel name."""
    per_label: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    kernels = 0

    def visit(evt, label):
        nonlocal kernels
        if evt.name.startswith("glmtg:"):
            label = evt.name[len("glmtg:"):]
        for k in evt.kernels:
            per_label[label][0] += k.duration
            per_label[label][1] += 1
            kernels += 1
        for child in evt.cpu_children:
            visit(child, label)

    device_kernels = 0
    all_names: collections.Counter[str] = collections.Counter()
    name_us: collections.Counter[str] = collections.Counter()
    for evt in prof.events():
        if evt.cpu_parent is None and evt.device_type.name == "CPU":
            visit(evt, "(other)")
        elif evt.device_type.name == "CUDA":  # every kernel, Triton launches included (not all are attributed)
            device_kernels += 1
            all_names[evt.name[:60]] += 1
            name_us[evt.name[:60]] += evt.time_range.elapsed_us()
    rows = [{"part": lab, "us_per_step": t / steps, "kernels_per_step": n / steps}
            for lab, (t, n) in sorted(per_label.items(), key=lambda kv: -kv[1][0])]
    # Every launch by kernel name, most frequent first: the nodes a CUDA graph replays. Triton launches
    # bypass the op-level correlation, so the module table above holds torch's kernels only; the
    # profiler's durations of uncorrelated launches are eager-mode times (inflated by launch gaps): a guide
    # to where a step's time goes, not a graph step's share.
    top = [{"kernel": nm, "calls_per_step": n / steps, "eager_us_per_step": name_us[nm] / steps}
           for nm, n in all_names.most_common(40)]
    return rows + [{"top_kernels": top}], device_kernels // steps


def _rank_part(model: torch.nn.Module, config, file_type, n: int, experts_split) -> tuple[torch.nn.Module, int]:
    """Rank 0's part of ``model`` split n ways (``-sm graph``), with every sum and gather a no-op (the
    gather repeats the rank's logits to keep the shape): what one rank computes when no peer is waited for."""
    from glmtg.formats.mix import weight_formats_for
    from glmtg.parallel import TPGroup, build_tp_model, load_from_full, local_kv_heads

    tp = TPGroup(0, n)
    TPGroup.all_reduce = lambda self, x, parity=0: x
    TPGroup.all_gather_last = lambda self, x: x.repeat(*([1] * (x.dim() - 1)), self.world_size)
    formats = None if file_type is None else weight_formats_for(file_type, config)
    kw = {} if experts_split is None else {"experts_split": experts_split}
    part = load_from_full(build_tp_model(config, tp, model.dtype, weight_formats=formats, **kw), model)
    return part.cuda(), local_kv_heads(config, tp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="glm-4.5-air")
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--type", default="Q4_0", help="llama.cpp file type of the random weights (or 'bf16')")
    p.add_argument("--depth", type=int, default=0, help="cached tokens before the step")
    p.add_argument("-ctk", "--cache-type", default="f16", help="K and V cache format")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (one token each)")
    p.add_argument("--glue", choices=("auto", "on", "off"), default="auto",
                   help="the decoder glue as fused kernels or torch ops (glmtg.layers.fused)")
    p.add_argument("--tp-part", type=int, default=1, metavar="N",
                   help="profile rank 0's part of an N-way -sm graph split alone, its sums and gathers made "
                        "no-ops: the compute a rank does, without communication or waiting for peers")
    p.add_argument("--tp-experts", default=None, help="with --tp-part: the routed experts' split (width|expert)")
    p.add_argument("--out", type=Path, default=None, help="output stem")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: step_profile.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from glmtg.kv_cache import KVCache
    from glmtg.layers import fused

    fused.set_mode(args.glue)
    from glmtg.loading.presets import preset_config, random_model

    config = preset_config(args.preset, args.n_layers)
    file_type = None if args.type == "bf16" else args.type
    model = random_model(config, device="cuda", file_type=file_type)
    kv_heads = config.num_key_value_heads
    if args.tp_part > 1:
        model, kv_heads = _rank_part(model, config, file_type, args.tp_part, args.tp_experts)
    fmt = {"f16": "f16", "bf16": "bf16"}.get(args.cache_type, args.cache_type)
    cache = KVCache(num_layers=config.num_hidden_layers, batch=args.batch, capacity=args.depth + 64,
                    num_kv_heads=kv_heads, head_dim=config.head_dim, k_format=fmt, device="cuda")
    cache.lengths.fill_(args.depth)
    token = torch.randint(0, config.vocab_size, (args.batch, 1), device="cuda")

    def step():
        return model(token, cache, attn_backend="glmtg", validate=False)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph_s = common.time_graph([step], replays=100)
    eager_s = common.time_graph([step], replays=20, use_graph=False)
    handles = _label_hooks(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    for h in handles:
        h.remove()
    rows, kernels = _kernel_table(prof, args.steps)
    top = rows.pop()["top_kernels"]
    kernel_us = sum(r["us_per_step"] for r in rows)  # torch kernels (attributed) only
    weight_bytes = model.decode_weight_bytes()
    copy = common.copy_bandwidth()
    result = {
        "environment": common.environment(), "copy_bandwidth": copy, "preset": args.preset,
        "n_layers": args.n_layers, "type": args.type, "depth": args.depth, "cache": fmt, "glue": args.glue,
        "tp_part": args.tp_part, "tp_experts": args.tp_experts, "batch": args.batch,
        "graph_us": graph_s * 1e6, "eager_us": eager_s * 1e6, "kernel_us": kernel_us,
        "kernels_per_step": kernels, "weight_bytes": weight_bytes,
        "weight_floor_us": weight_bytes / copy * 1e6, "parts": rows, "top_kernels": top,
    }
    stem = args.out or common.result_path("step_profile",
                                          f"{args.preset}-{args.n_layers}l-{args.type}-{args.depth}-{args.glue}"
                                          + (f"-tp{args.tp_part}" if args.tp_part > 1 else "")
                                          + (f"-b{args.batch}" if args.batch > 1 else ""))
    common.write_json(stem.with_suffix(".json"), result)
    lines = [f"# One decode step: {args.preset}, {args.n_layers} layers, {args.type}, depth {args.depth}, "
             f"cache {fmt}, glue {args.glue}, batch {args.batch}"
             + (f"; rank 0's part of a {args.tp_part}-way -sm graph split, its collectives no-ops"
                if args.tp_part > 1 else ""), "",
             f"{result['environment'].get('device')}, torch {torch.__version__}, "
             f"{result['environment']['date']}", "",
             f"graph step {graph_s * 1e6:.1f} µs ({1 / graph_s:.0f} t/s), eager {eager_s * 1e6:.1f} µs, "
             f"{kernels} launches (torch's kernels: {kernel_us:.1f} µs); weights {weight_bytes / 1e9:.3f} GB "
             f"= {result['weight_floor_us']:.1f} µs at the copy read rate", "",
             "| part (torch kernels, by the module that launched them) | µs / step | kernels / step |",
             "|---|---|---|"]
    lines += [f"| {r['part']} | {r['us_per_step']:.1f} | {r['kernels_per_step']:.0f} |" for r in rows]
    lines += ["", "| kernel (every launch) | calls / step | eager µs / step |", "|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['calls_per_step']:.0f} | {r['eager_us_per_step']:.1f} |" for r in top]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
