"""Server metrics in the Prometheus text format (version 0.0.4), written by hand.

Hand-written rather than prometheus_client so that each app holds its own counters (no global
registry shared between servers in one process) and the server needs no extra dependency. Counters and
histograms are updated on the event loop only; gauges come from the engine's latest stats.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

PREFIX = "glmtg"
# seconds; TTFT spans a queue wait and a long prefill, inter-token latency one decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram (Prometheus ``le`` semantics: a value equal to a bound counts in it)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf only
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """One server's counters and latency histograms."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {}  # by finish reason
        self.requests_rejected = 0  # 4xx/503 answered before generation
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def observe_tokens(self, times: Sequence[float], start: float, previous: float | None) -> float | None:
        """Record the arrival ``times`` of new tokens of a request that started at ``start``; ``previous``
        is its last token's time (None before the first). Returns the new last time."""
        for t in times:
            if previous is None:
                self.ttft.observe(t - start)
            else:
                self.itl.observe(t - previous)
            previous = t
        self.generation_tokens += len(times)
        return previous

    def finished(self, reason: str | None, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        key = reason or "unknown"
        self.requests_finished[key] = self.requests_finished.get(key, 0) + 1

    def render(self, stats: dict[str, Any], alive: bool) -> str:
        """The exposition text: gauges from the engine's ``stats`` plus this server's counters."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {PREFIX}_{name} {help_text}")
            out.append(f"# TYPE {PREFIX}_{name} {kind}")
            out.extend(f"{PREFIX}_{line}" for line in lines)

        def gauge(name: str, help_text: str, value: Any) -> None:
            metric(name, "gauge", help_text, [f"{name} {_num(value)}"])

        gauge("engine_alive", "1 while the engine runs, 0 once it has failed", 1 if alive else 0)
        gauge("requests_running", "requests being prefilled or decoded", stats.get("running", 0))
        gauge("requests_waiting", "requests queued for admission", stats.get("waiting", 0))
        gauge("kv_cache_usage_ratio", "fraction of KV-cache pages in use (0..1)", stats.get("kv_usage", 0.0))
        gauge("kv_cache_blocks_used", "KV-cache pages in use", stats.get("kv_blocks_used", 0))
        gauge("kv_cache_blocks_total", "KV-cache pages in the pool", stats.get("kv_blocks_total", 0))
        metric("prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
               [f"prefix_cache_hit_tokens_total {_num(stats.get('prefix_hit_tokens', 0))}"])
        metric("prompt_tokens_total", "counter", "prompt tokens of finished requests",
               [f"prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "tokens generated",
               [f"generation_tokens_total {self.generation_tokens}"])
        metric("requests_finished_total", "counter", "requests finished, by finish reason",
               [f'requests_finished_total{{finish_reason="{k}"}} {v}'
                for k, v in sorted(self.requests_finished.items())])
        metric("requests_rejected_total", "counter", "requests refused before generation (4xx, 503)",
               [f"requests_rejected_total {self.requests_rejected}"])
        metric("time_to_first_token_seconds", "histogram", "request arrival to its first token",
               self.ttft.lines("time_to_first_token_seconds"))
        metric("inter_token_latency_seconds", "histogram", "time between consecutive tokens of a request",
               self.itl.lines("inter_token_latency_seconds"))
        return "\n".join(out) + "\n"


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
