"""A decode step's CUDA-graph time under each launch mode of glmtg/kernels/pdl.py, and whether the logits stay
bit-identical across them.

The modes: "off" (plain launches) and "auto" (programmatic dependent launch on sm_90+: a kernel launches
while the one before finishes). The arithmetic is the same in every mode, so the logits of one step must be equal bit for bit: a
difference means a kernel read something before its wait (a race), and the run exits 1.

    python bench/pdl_step.py                                    # 8-layer Air, Q4_0 and Q4_K_M, depth 0
    python bench/pdl_step.py --types Q4_0 --depths 0 65536 --caches f16 q8_0

Writes results/pdl_step/<date>-<preset>-<n>l.{json,md,png}: per (type, depth, cache) the median graph
step per mode, t/s, and the weight bytes at the measured copy rate (the step's weight floor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

MODES = ("off", "auto")


def _case(model, config, depth: int, cache_fmt: str, modes: list[str], replays: int) -> tuple[dict, bool]:
    from glmtg.kernels import pdl
    from glmtg.kernels.gguf import activation
    from glmtg.kv_cache import KVCache

    cache = KVCache(num_layers=config.num_hidden_layers, batch=1, capacity=depth + 256,
                    num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format=cache_fmt,
                    device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    # The cached rows the step attends to: random and finite (an empty cache's garbage may hold NaNs).
    for data, scale in ((view.data, view.scale) for layer in range(config.num_hidden_layers)
                        for view in (cache.k(layer), cache.v(layer))):
        if data.is_floating_point() and data.element_size() >= 2:
            data.normal_(0.0, 1.0, generator=gen)
        else:
            data.view(torch.uint8).random_(0, 256, generator=gen)
            if data.is_floating_point():  # fp8 codes: clear the bits that could make NaN
                data.view(torch.uint8).bitwise_and_(0xBF)
        if scale is not None:
            scale.uniform_(1e-3, 1e-2, generator=gen)
    token = torch.randint(0, config.vocab_size, (1, 1), device="cuda", generator=gen)

    def step():
        return model(token, cache, attn_backend="glmtg", validate=False)

    row, logits, same = {}, {}, True
    for m in modes:
        with pdl.mode(m):
            activation.forget()
            cache.lengths.fill_(depth)
            logits[m] = step().float().cpu()  # eager, compiles this mode's kernels
            cache.lengths.fill_(depth)
            row[m] = common.time_graph([step], replays=replays)
            activation.forget()
    ref = logits[modes[0]]
    for m in modes[1:]:
        equal = torch.equal(logits[m], ref)
        row[f"{m}_equal"] = equal
        same &= equal
    return row, same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="glm-4.5-air")
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M"])
    p.add_argument("--depths", type=int, nargs="+", default=[0])
    p.add_argument("--caches", nargs="+", default=["f16"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="output stem")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: pdl_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from glmtg.loading.presets import preset_config, random_model

    config = preset_config(args.preset, args.n_layers)
    copy = common.copy_bandwidth()
    rows, all_same = [], True
    for ftype in args.types:
        model = random_model(config, device="cuda", file_type=ftype)
        weight_bytes = model.decode_weight_bytes()
        for depth in args.depths:
            for cache_fmt in args.caches:
                row, same = _case(model, config, depth, cache_fmt, args.modes, args.replays)
                all_same &= same
                row.update(type=ftype, depth=depth, cache=cache_fmt, weight_bytes=weight_bytes,
                           weight_floor_us=weight_bytes / copy * 1e6)
                rows.append(row)
                print(" ".join(f"{k}={v * 1e6:.1f}us" if isinstance(v, float) and k in args.modes else f"{k}={v}"
                               for k, v in row.items()), flush=True)
        del model
        torch.cuda.empty_cache()
    result = {"environment": common.environment(), "copy_bandwidth": copy, "preset": args.preset,
              "n_layers": args.n_layers, "modes": args.modes, "rows": rows, "logits_equal": all_same}
    stem = args.out or common.result_path("pdl_step", f"{args.preset}-{args.n_layers}l")
    common.write_json(stem.with_suffix(".json"), result)
    env = result["environment"]
    lines = [f"# Decode step by launch mode: {args.preset}, {args.n_layers} layers, batch 1", "",
             f"{env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}; copy "
             f"{copy / 1e12:.2f} TB/s; logits bit-identical across modes: {all_same}", "",
             "| type | depth | cache | " + " | ".join(f"{m} µs (t/s)" for m in args.modes)
             + " | weight floor µs | best: % of floor |",
             "|---|---|---|" + "---|" * len(args.modes) + "---|---|"]
    for r in rows:
        best = min(r[m] for m in args.modes)
        lines.append(f"| {r['type']} | {r['depth']} | {r['cache']} | "
                     + " | ".join(f"{r[m] * 1e6:.1f} ({1 / r[m]:.0f})" for m in args.modes)
                     + f" | {r['weight_floor_us']:.1f} | {r['weight_floor_us'] / (best * 1e6):.0%} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, args.modes, stem.with_suffix(".png"), lines[2])
    return 0 if all_same else 1


def _plot(rows: list[dict], modes: list[str], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ax.bar([j + i * width for j in range(len(rows))], [1 / r[m] for r in rows], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['type']}\n{r['depth']} {r['cache']}" for r in rows])
    ax.set_ylabel("TG t/s (1 / graph step)")
    ax.set_title("decode step by launch mode\n" + subtitle.split(";")[0], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
