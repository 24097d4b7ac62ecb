"""llama-sweep-bench's method: PP and TG speed at every cache depth of one engine.

At each cache depth N_KV = 0, ub, 2ub, ...: generate TG tokens (timed, then removed from the cache),
then process PP = ub random tokens (timed, kept, so N_KV grows by ub per row), until the context is
full. Input tokens are random ids, as llama-sweep-bench uses. TG is also reported as bandwidth: the
bytes one decode step must read (active weights + the KV cache at that depth) times tokens per second;
the weights as the model stores them (``decode_weight_bytes``, quantized blocks included) where it says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine


@dataclass(frozen=True)
class SweepRow:
    """One row; field names are llama-sweep-bench's JSONL keys."""

    pp: int
    tg: int
    n_kv: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    tg_gbps: float | None = None  # estimated bytes read per TG token x tokens/s


def sweep_depths(ctx_size: int, ubatch: int, tg: int) -> list[int]:
    """N_KV of each row: multiples of ub whose TG and PP both fit in the context."""
    return [n for n in range(0, ctx_size, ubatch) if n + max(ubatch, tg) <= ctx_size]


def active_weight_bytes(config: ModelConfig, bytes_per_weight: float) -> int:
    """Weight bytes one decode token reads: all but the unchosen routed experts, one embedding row.

    An estimate from the shapes (biases and norms ignored; the router is fp32, as the model keeps it).
    """
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = h * q + 2 * h * kv + q * h
    dense = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    moe = (config.num_experts_per_tok + config.n_shared_experts) * expert
    n_dense = config.first_k_dense_replace
    n_moe = config.num_hidden_layers - n_dense
    weights = h + config.vocab_size * h + config.num_hidden_layers * attention + n_dense * dense + n_moe * moe
    router = n_moe * h * config.n_routed_experts * 4
    return int(weights * bytes_per_weight + router)


def decode_weight_bytes(model: torch.nn.Module, config: ModelConfig) -> int:
    """Weight bytes one decode token reads: the model's own count (``model.decode_weight_bytes()``, which
    knows its quantized blocks) where it has one, else the shape estimate at its first parameter's size.

    The fallback is only right for a model held in one dtype: a quantized model's first parameter may be
    a uint8 block buffer (1 byte per element, not per weight).
    """
    count = getattr(model, "decode_weight_bytes", None)
    if callable(count):
        return int(count())
    return active_weight_bytes(config, next(model.parameters()).element_size())


def run_sweep(
    engine: Engine,
    *,
    tg: int,
    seed: int = 0,
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Run the sweep on an engine (batch 1) from an empty cache; rows as llama-sweep-bench makes them.

    ``on_row`` receives each row as soon as it is measured (the rows are also returned at the end).
    """
    if engine.settings.batch != 1:
        raise ValueError(f"sweep-bench runs one sequence; the engine has batch {engine.settings.batch}")
    ub, ctx = engine.settings.ubatch, engine.settings.ctx_size
    if tg < 1:
        raise ValueError(f"tg must be >= 1, got {tg}")
    depths = sweep_depths(ctx, ub, tg)
    if not depths:
        raise ValueError(f"ctx_size {ctx} is smaller than one step (ubatch {ub}, tg {tg}): nothing to measure")
    vocab = engine.config.vocab_size
    weight_bytes = decode_weight_bytes(engine.model, engine.config)
    kv_per_token = engine.cache.bytes_per_token
    gen = torch.Generator().manual_seed(seed)
    engine.reset()
    rows: list[SweepRow] = []
    for n_kv in depths:
        tg_ids = torch.randint(0, vocab, (tg,), generator=gen).to(engine.device)
        pp_ids = torch.randint(0, vocab, (ub,), generator=gen).to(engine.device)
        engine.synchronize()
        t0 = time.perf_counter()
        for i in range(tg):
            engine.decode_step(tg_ids[i:i + 1])
        engine.synchronize()
        t_tg = time.perf_counter() - t0
        engine.truncate(n_kv)

        engine.synchronize()
        t0 = time.perf_counter()
        engine.prefill(pp_ids)
        engine.synchronize()
        t_pp = time.perf_counter() - t0

        speed_tg = tg / t_tg
        # token i of the TG run reads n_kv + i + 1 cached tokens: the mean depth is n_kv + (tg + 1) / 2
        step_bytes = weight_bytes + kv_per_token * (n_kv + (tg + 1) / 2)
        row = SweepRow(pp=ub, tg=tg, n_kv=n_kv, t_pp=t_pp, speed_pp=ub / t_pp, t_tg=t_tg, speed_tg=speed_tg,
                       tg_gbps=speed_tg * step_bytes / 1e9)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    engine.reset()
    return rows


def write_json(path: str | Path, rows: list[SweepRow], environment: dict[str, Any], tg: int) -> None:
    """The result file ``glmtg plot`` and bench/sweep_bench_compare.py read: rows + environment."""
    doc = {"tool": "glmtg sweep-bench", "environment": environment, "pp": rows[0].pp if rows else None, "tg": tg,
           "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def run_label(environment: dict[str, Any]) -> str:
    """A plot label from a result's environment: attention backend and KV cache types."""
    kv = environment.get("ctk", "?")
    if environment.get("ctv") not in (None, kv):
        kv = f"{kv}/{environment['ctv']}"
    return f"attn={environment.get('attn', '?')} kv={kv}"
