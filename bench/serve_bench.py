"""The serving engine's decode throughput and latency at 1 to 64 concurrent streams, beside each batch's
bandwidth bound, and the time to first token of a follow-up chat turn with and without the prefix cache.

Drives glmtg.serve's LLMEngine and ModelRunner directly (no HTTP: this measures the engine) on a random
preset model (8-layer GLM-4.5-Air shapes by default, a llama.cpp Q4_0 mix or bf16 weights):

    python bench/serve_bench.py                        # Q4_0, 1/8/32/64 streams, 1k prompts, 64 tokens each
    python bench/serve_bench.py --type bf16 --long     # bf16 weights; 16k prompts as well

Each level submits all its streams at once; the scheduler prefills them one chunk at a time, interleaved with
decode steps of the streams already running. Stream i (in admission order) asks for ``--decode-tokens`` plus
the decode steps it runs while the later prompts are prefilled, so every stream then decodes its last
``--decode-tokens`` - 1 tokens in steps of the full width: "decode tok/s" is streams x those steps over their
time (each step timed on the host around the runner's call, which ends with the sampled tokens on the host,
so it is the engine's own rate). Time to first token counts from the submission of all streams; inter-token
latency is every gap between a stream's consecutive tokens (prefill chunks in between included).

The bound of a step is the bytes it must read over the measured copy rate (common.copy_bandwidth): every
weight a decode token reads (model.decode_weight_bytes()) with the routed experts replaced by the union the
batch selects, estimated as E·(1-(1-k/E)^B) experts per MoE layer for B streams with uniform routing, plus
every stream's K/V up to its position. Writes results/serve/<date>-<preset>-<n>l-<type>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


class TimedRunner:
    """The runner as LLMEngine sees it; notes each call's decode rows, prefill rows, K/V tokens and seconds."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.block_size, self.num_blocks = runner.block_size, runner.num_blocks
        self.max_model_len = runner.max_model_len
        self.calls: list[tuple[int, int, int, float]] = []

    def run(self, batch):
        t0 = time.perf_counter()
        out = self.runner.run(batch)  # ends with the sampled tokens on the host: the step is done
        seconds = time.perf_counter() - t0
        decode = [i for i, t in enumerate(batch.token_ids) if len(t) == 1]
        kv_tokens = sum(batch.start_positions[i] + 1 for i in decode)
        self.calls.append((len(decode), len(batch.token_ids) - len(decode), kv_tokens, seconds))
        return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def expert_bytes(model) -> tuple[int, int]:
    """(bytes of one routed expert summed over the MoE layers, experts per token counted by
    decode_weight_bytes per layer)."""
    from glmtg.layers.moe import Experts
    from glmtg.layers.quant_experts import QuantExperts

    per_expert, counted = 0, 0
    k = model.config.num_experts_per_tok
    for module in model.modules():
        if isinstance(module, (Experts, QuantExperts)):
            stacked = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            per_expert += stacked // module.placement.count
            counted = min(k, module.placement.count)
    return per_expert, counted


def union_experts(num_experts: int, k: int, streams: int) -> float:
    """Expected distinct experts that ``streams`` tokens choose, each k of E uniformly."""
    return num_experts * (1 - (1 - k / num_experts) ** streams)


def run_level(runner, config, streams: int, prompt_tokens: int, decode_tokens: int, chunk: int, seed: int) -> dict:
    """One level: ``streams`` prompts submitted at once; the measurements of the module doc."""
    from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
    from glmtg.serve.sequence import SamplingSpec

    timed = TimedRunner(runner)
    engine = LLMEngine(timed, SchedulerConfig(max_num_seqs=streams, max_prefill_tokens=chunk,
                                              max_model_len=runner.max_model_len, max_waiting=streams,
                                              enable_prefix_cache=False), eos_token_ids=())
    gen = torch.Generator().manual_seed(seed)
    chunks = -(-prompt_tokens // chunk)
    replays0 = runner.graph_replays
    t0 = time.perf_counter()
    for i in range(streams):
        prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=gen).tolist()
        engine.add_request(f"s{i}", prompt, SamplingSpec(temperature=0.0),
                           max_tokens=decode_tokens + chunks * (streams - 1 - i))
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(streams)}
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter()
        for ev in events:
            if ev.token_id is not None:
                times[ev.request_id].append(now)
    ttft = [t[0] - t0 for t in times.values()]
    itl = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    full = [(kv, s) for d, p, kv, s in timed.calls if d == streams and p == 0]
    if not full:
        raise RuntimeError(f"no decode step of all {streams} streams at once; raise --decode-tokens")
    seconds = sum(s for _, s in full)
    return {
        "streams": streams, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "full_steps": len(full), "step_ms": seconds / len(full) * 1e3,
        "decode_tok_s": streams * len(full) / seconds,
        "kv_tokens_per_step": sum(kv for kv, _ in full) / len(full),
        "ttft_ms_median": statistics.median(ttft) * 1e3, "ttft_ms_p99": percentile(ttft, 99) * 1e3,
        "itl_ms_median": statistics.median(itl) * 1e3, "itl_ms_p99": percentile(itl, 99) * 1e3,
        "graph_replays": runner.graph_replays - replays0,
        "decode_calls": sum(1 for d, _, _, _ in timed.calls if d),
    }


def add_bound(row: dict, model, config, kv_bytes_per_token: int, copy: float) -> None:
    """The step's bytes and bound (module doc) and the fraction of it the measured rate reaches."""
    per_expert, counted = expert_bytes(model)
    union = union_experts(config.n_routed_experts, config.num_experts_per_tok, row["streams"])
    weights = model.decode_weight_bytes() + per_expert * (union - counted)
    kv = row["kv_tokens_per_step"] * kv_bytes_per_token
    bound_s = (weights + kv) / copy
    row.update(union_experts=union, weight_gb=weights / 1e9, kv_gb=kv / 1e9, bound_step_ms=bound_s * 1e3,
               bound_tok_s=row["streams"] / bound_s, of_bound=row["decode_tok_s"] * bound_s / row["streams"])


def time_to_first_token(engine, request_id: str, prompt: list[int], decode: int) -> tuple[float, int, list[int]]:
    """(seconds from submission to the first token, prompt tokens served from the cache, the tokens)."""
    from glmtg.serve.sequence import SamplingSpec

    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingSpec(temperature=0.0), max_tokens=decode)
    first, cached, tokens = None, 0, []
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.token_id is not None:
                if first is None:
                    first, cached = time.perf_counter() - t0, ev.cached_tokens
                tokens.append(ev.token_id)
    return first, cached, tokens


def multi_turn(model, config, args) -> dict:
    """A follow-up turn over a ``--history``-token chat: time to first token with the history cached, then
    (a fresh engine, prefix cache off) without."""
    from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
    from glmtg.serve.runner import ModelRunner

    new_turn, decode = 64, 16
    max_len = args.history + 2 * decode + new_turn + args.block_size
    runner = ModelRunner(model, config, block_size=args.block_size, max_num_seqs=1, max_model_len=max_len,
                         k_format=args.cache_type, device="cuda", cuda_graphs=not args.no_cuda_graph)
    gen = torch.Generator().manual_seed(7)
    history = torch.randint(0, config.vocab_size, (args.history,), generator=gen).tolist()

    def engine(prefix_cache: bool) -> LLMEngine:
        return LLMEngine(runner, SchedulerConfig(max_num_seqs=1, max_prefill_tokens=args.chunk, max_model_len=max_len,
                                                 enable_prefix_cache=prefix_cache), eos_token_ids=())

    cached_engine = engine(True)
    first_turn, _, reply = time_to_first_token(cached_engine, "turn1", history, decode)  # also the warm-up
    # A throwaway follow-up of the same length first: it prefills the same number of new tokens over the same
    # cached history, so kernels specialised on that chunk shape are compiled before the timed turn.
    warm = history + reply + torch.randint(0, config.vocab_size, (new_turn,), generator=gen).tolist()
    time_to_first_token(cached_engine, "warm", warm, decode)
    follow = history + reply + torch.randint(0, config.vocab_size, (new_turn,), generator=gen).tolist()
    with_cache, hit, tokens_cached = time_to_first_token(cached_engine, "turn2", follow, decode)
    # A fresh engine (its own block manager) over the same pool: the history's pages are not known to it.
    without, _, tokens_fresh = time_to_first_token(engine(False), "turn2", follow, decode)
    return {"history_tokens": args.history, "follow_up_tokens": len(follow), "cached_tokens": hit,
            "first_turn_ttft_ms": first_turn * 1e3, "ttft_ms_cached": with_cache * 1e3,
            "ttft_ms_uncached": without * 1e3, "speedup": without / with_cache,
            "same_tokens": tokens_cached == tokens_fresh}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="glm-4.5-air")
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--type", default="Q4_0", help="bf16, or a llama.cpp file type for random_model (Q4_0, Q4_K_M ...)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--long", action="store_true", help="also run every level with 16k-token prompts")
    p.add_argument("--long-tokens", type=int, default=16384)
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens each stream decodes at full width (+1)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per prefill step)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-type", default="bf16", help="KV cache format")
    p.add_argument("--history", type=int, default=16384, help="multi-turn: tokens of chat history")
    p.add_argument("--no-multi-turn", action="store_true")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly (no CUDA graphs)")
    p.add_argument("--out", type=Path, default=None, help="output stem")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: serve_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if min(args.streams) < 1 or args.decode_tokens < 2 or min(args.prompt_tokens, args.chunk, args.history) < 1:
        print("error: --streams, --prompt-tokens, --chunk and --history must be >= 1, --decode-tokens >= 2",
              file=sys.stderr)
        return 2
    from glmtg.loading.presets import preset_config, random_model
    from glmtg.serve.runner import ModelRunner

    t_start = time.perf_counter()
    config = preset_config(args.preset, args.n_layers)
    copy = common.copy_bandwidth()
    model = random_model(config, device="cuda", file_type=None if args.type == "bf16" else args.type)
    rows = []
    prompts = [args.prompt_tokens] + ([args.long_tokens] if args.long else [])
    widest = max(args.streams)
    for prompt_tokens in prompts:
        chunks = -(-prompt_tokens // args.chunk)
        max_len = prompt_tokens + args.decode_tokens + chunks * (widest - 1) + args.block_size
        runner = ModelRunner(model, config, block_size=args.block_size, max_num_seqs=widest, max_model_len=max_len,
                             k_format=args.cache_type, device="cuda", cuda_graphs=not args.no_cuda_graph)
        # Warm-up outside the timings: the prefill chunk's shapes and the decode kernels of a small batch.
        run_level(runner, config, min(2, widest), prompt_tokens, 4, args.chunk, seed=99)
        for streams in args.streams:
            row = run_level(runner, config, streams, prompt_tokens, args.decode_tokens, args.chunk, seed=streams)
            add_bound(row, model, config, runner.cache.bytes_per_token, copy)
            rows.append(row)
            print(f"prompt {prompt_tokens:>6} streams {streams:>3}: {row['decode_tok_s']:8.1f} tok/s "
                  f"(bound {row['bound_tok_s']:8.1f}, {row['of_bound']:.0%}), step {row['step_ms']:.2f} ms, "
                  f"TTFT {row['ttft_ms_median']:.0f}/{row['ttft_ms_p99']:.0f} ms, "
                  f"ITL {row['itl_ms_median']:.2f}/{row['itl_ms_p99']:.2f} ms, replays {row['graph_replays']}",
                  flush=True)
        del runner
        torch.cuda.empty_cache()
    turn = None if args.no_multi_turn else multi_turn(model, config, args)
    result = {"environment": common.environment(), "copy_bandwidth": copy, "preset": args.preset,
              "n_layers": args.n_layers, "type": args.type, "cache_type": args.cache_type, "chunk": args.chunk,
              "block_size": args.block_size, "cuda_graphs": not args.no_cuda_graph,
              "decode_weight_bytes": model.decode_weight_bytes(), "rows": rows, "multi_turn": turn,
              "seconds": time.perf_counter() - t_start}
    stem = args.out or common.result_path("serve", f"{args.preset}-{args.n_layers}l-{args.type}")
    common.write_json(stem.with_suffix(".json"), result)
    lines = report(result)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(result, stem.with_suffix(".png"))
    return 0


def report(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"# glmtg serve engine: {result['preset']}, {result['n_layers']} layers, {result['type']} weights, "
             f"{result['cache_type']} KV", "",
             f"{env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}; copy "
             f"{result['copy_bandwidth'] / 1e12:.2f} TB/s; CUDA graphs {'on' if result['cuda_graphs'] else 'off'}; "
             f"prefill chunk {result['chunk']}", "",
             "| prompt | streams | decode tok/s | bound tok/s | of bound | step ms | experts/layer | weights GB | "
             "KV GB | TTFT ms (median / p99) | ITL ms (median / p99) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['streams']} | {r['decode_tok_s']:.0f} | {r['bound_tok_s']:.0f} | "
                     f"{r['of_bound']:.0%} | {r['step_ms']:.2f} | {r['union_experts']:.1f} | {r['weight_gb']:.2f} | "
                     f"{r['kv_gb']:.2f} | {r['ttft_ms_median']:.0f} / {r['ttft_ms_p99']:.0f} | "
                     f"{r['itl_ms_median']:.2f} / {r['itl_ms_p99']:.2f} |")
    lines += ["", "Bound: the step's bytes (weights with the expected union of routed experts, plus every stream's "
              "K/V) over the copy rate; decode tok/s over steps of all streams at once (module doc of "
              "bench/serve_bench.py)."]
    t = result["multi_turn"]
    if t is not None:
        lines += ["", f"Multi-turn: a follow-up of {t['follow_up_tokens']} tokens over a {t['history_tokens']}-token "
                  f"history: time to first token {t['ttft_ms_cached']:.1f} ms with the prefix cached "
                  f"({t['cached_tokens']} tokens from the cache) vs {t['ttft_ms_uncached']:.1f} ms without: "
                  f"{t['speedup']:.1f}x sooner; same tokens: {t['same_tokens']}"]
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4))
    for prompt in sorted({r["prompt_tokens"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["prompt_tokens"] == prompt]
        streams = [r["streams"] for r in rows]
        line, = ax.plot(streams, [r["decode_tok_s"] for r in rows], "o-", label=f"measured, {prompt}-token prompts")
        ax.plot(streams, [r["bound_tok_s"] for r in rows], "--", color=line.get_color(), label=f"bound, {prompt}")
        lat.plot(streams, [r["itl_ms_median"] for r in rows], "o-", label=f"ITL median, {prompt}")
        lat.plot(streams, [r["itl_ms_p99"] for r in rows], "x--", label=f"ITL p99, {prompt}")
    for a in (ax, lat):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent streams")
        a.legend(fontsize=7)
    ax.set_ylabel("aggregate decode tok/s")
    lat.set_ylabel("inter-token latency ms")
    env = result["environment"]
    title = f"{result['preset']} {result['n_layers']}L {result['type']}, {env.get('device')}, {env['date']}"
    t = result["multi_turn"]
    if t is not None:
        title += f"\nfollow-up over {t['history_tokens']} tokens: TTFT {t['speedup']:.1f}x sooner with prefix cache"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
