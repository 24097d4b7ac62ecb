"""-sm graph's routed experts split along their width or by expert: the decode time of the slowest rank, on ONE
GPU (every rank's part built and timed in turn), at batch 1 and 32. A proxy for the choice of
``glmtg.parallel.DEFAULT_EXPERTS_SPLIT`` where no multi-GPU machine is lent; the end-to-end check is
``glmtg sweep-bench -sm graph --gpus N --tp-experts width|expert`` (batch 1).

    python bench/tp_experts.py --preset glm-4.5 --type Q4_K_M --ranks 2 4   # -> results/tp_experts/<date>-...json

Per (ranks N, batch B): the whole layer's experts (one GPU), then each rank's part for both splits, called
in a CUDA graph over 16 routing sets (distinct experts within a token, sets rotating over the experts so no
call reads from L2), median per call (bench/common.py time_graph). One layer's experts, the formats
``--type`` gives its layer ``--layer``; random bytes (timing does not depend on the values).

- width: every rank reads 1/N of each chosen expert (its cut of whole blocks of down's format: uneven cuts
  make the first ranks slower); the ranks see the same routing, so the step waits for max_r t_r.
- expert: rank r reads only the chosen experts in its range. At batch 1 that count c_r varies with the
  routing; each rank's time is measured for every count c (ids with exactly c slots in its range), and the
  step estimate is the mean over 20000 random routings of max_r t_r(c_r). At batch > 1 each rank is timed
  over random routings and the estimate is max_r of the means (the counts even out over B x k pairs).

Not counted: the all-reduce (one per layer, the same for both splits), attention, the shared expert.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, time_graph, write_json  # noqa: E402

from glmtg.config import ModelConfig  # noqa: E402
from glmtg.formats.mix import FILE_TYPES, weight_formats_for  # noqa: E402
from glmtg.layers.quant_experts import PARAMS, QuantExperts  # noqa: E402
from glmtg.parallel import TPGroup  # noqa: E402
from glmtg.parallel.experts import expert_range, width_experts  # noqa: E402

SETS = 16
MONTE_CARLO = 20000


def _random_bytes(module: QuantExperts, device: torch.device) -> QuantExperts:
    """``module`` (built on the meta device) with random uint8 stacks on ``device``."""
    for p in PARAMS:
        shape = getattr(module, p).shape
        setattr(module, p, torch.nn.Parameter(torch.randint(0, 256, shape, dtype=torch.uint8, device=device),
                                              requires_grad=False))
    return module


def _routings(batch: int, e: int, k: int, g: torch.Generator, inside: range | None = None,
              count: int = 0) -> list[torch.Tensor]:
    """SETS ids [B, k]; with ``inside``, each token has exactly ``count`` slots in it (the rest outside),
    experts rotating over the sets."""
    sets = []
    for s in range(SETS):
        rows = []
        for _ in range(batch):
            if inside is None:
                rows.append(torch.randperm(e, generator=g)[:k])
                continue
            ins = torch.tensor(list(inside))
            outs = torch.tensor([i for i in range(e) if i not in inside])
            a = ins[(torch.arange(count) + s * count) % len(ins)]
            b = outs[torch.randperm(len(outs), generator=g)[:k - count]]
            rows.append(torch.cat([a, b]))
        sets.append(torch.stack(rows))
    return sets


def _time(module: QuantExperts, x: torch.Tensor, sets: list[torch.Tensor], replays: int) -> float:
    dev = x.device
    ws = [torch.rand(s.shape, device=dev) for s in sets]
    ids = [s.to(dev) for s in sets]
    return time_graph([lambda i=i, w=w: module(x, i, w) for i, w in zip(ids, ws)], replays=replays)


def run(config: ModelConfig, formats: dict[str, str], ranks: int, batch: int, replays: int, seed: int,
        dev: torch.device | None = None) -> dict:
    """One (ranks, batch) row: the whole layer's time, each rank's for both splits, the step estimates."""
    dev = torch.device("cuda") if dev is None else dev
    e, k, h = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h, device=dev, dtype=torch.bfloat16) * 0.05
    random_sets = _routings(batch, e, k, g)
    with torch.device("meta"):  # the stacks are allocated on the GPU by _random_bytes
        whole = QuantExperts(config, torch.bfloat16, formats)
    whole = _random_bytes(whole, dev)
    row: dict = {"ranks": ranks, "batch": batch, "whole_us": _time(whole, x, random_sets, replays) * 1e6}
    del whole
    width = []
    for r in range(ranks):
        with torch.device("meta"):
            part = width_experts(config, torch.bfloat16, TPGroup(r, ranks), formats, "auto")
        part = _random_bytes(part, dev)
        width.append(_time(part, x, random_sets, replays) * 1e6)
        del part
    row["width_us_per_rank"], row["width_us"] = width, max(width)
    by_count: list[list[float]] = []
    means = []
    for r in range(ranks):
        placement = expert_range(config, TPGroup(r, ranks))
        with torch.device("meta"):
            part = QuantExperts(config, torch.bfloat16, formats, placement=placement)
        part = _random_bytes(part, dev)
        if batch == 1:
            inside = range(placement.start, placement.stop)
            by_count.append([_time(part, x, _routings(1, e, k, g, inside, c), replays) * 1e6
                             for c in range(min(k, placement.count) + 1)])
        else:
            means.append(_time(part, x, random_sets, replays) * 1e6)
        del part
    if batch == 1:
        bounds = [expert_range(config, TPGroup(r, ranks)) for r in range(ranks)]
        total = 0.0
        for _ in range(MONTE_CARLO):
            chosen = torch.randperm(e, generator=g)[:k]
            total += max(by_count[r][int(((chosen >= b.start) & (chosen < b.stop)).sum())]
                         for r, b in enumerate(bounds))
        row["expert_us_by_count"], row["expert_us"] = by_count, total / MONTE_CARLO
    else:
        row["expert_us_per_rank"], row["expert_us"] = means, max(means)
    row["faster"] = "width" if row["width_us"] < row["expert_us"] else "expert"
    return row


def markdown(payload: dict) -> str:
    title = (f"# Routed experts per rank: {payload['preset']} {payload['type']} (layer {payload['layer']}: "
             f"{payload['formats']})")
    header = "| ranks | batch | whole µs | width µs (slowest rank) | expert µs (est. slowest) | faster |"
    lines = [title, "", header, "|---|---|---|---|---|---|"]
    for r in payload["results"]:
        lines.append(f"| {r['ranks']} | {r['batch']} | {r['whole_us']:.1f} | {r['width_us']:.1f} | "
                     f"{r['expert_us']:.1f} | {r['faster']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="glm-4.5", choices=ModelConfig.PRESETS)
    p.add_argument("--type", default="Q4_K_M", choices=FILE_TYPES, help="llama.cpp file type of the experts")
    p.add_argument("--layer", type=int, default=None, help="layer whose formats to take (default: first MoE)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU")
    config = ModelConfig.preset(args.preset)
    layer = config.first_k_dense_replace if args.layer is None else args.layer
    wf = weight_formats_for(args.type, config)
    formats = {prm: wf(f"layers.{layer}.mlp.experts.{prm}", None) for prm in PARAMS}
    results = [run(config, formats, n, b, args.replays, seed=n * 100 + b) for n in args.ranks for b in args.batch]
    payload = {"environment": environment(), "preset": args.preset, "type": args.type, "layer": layer,
               "formats": formats, "results": results}
    stem = args.out or result_path("tp_experts", f"{args.preset}-{args.type.lower()}")
    write_json(Path(stem).with_suffix(".json"), payload)
    Path(stem).with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
