"""Timing and reporting helpers shared by the device benchmarks."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch

L2_DEFEAT_BYTES = 3 * 50 * 2**20  # rotate over at least three times the H100's 50 MB L2
RESULTS = Path(__file__).resolve().parent / "results"


def result_path(topic: str, what: str, suffix: str = "") -> Path:
    """Default output of a benchmark: results/<topic>/<UTC date>-<what><suffix> (bench/README.md).

    ``suffix`` is ".json" etc., or "" for a path stem that the caller extends per output file.
    """
    if not topic or not what or "/" in topic + what:
        raise ValueError(f"topic and what must be non-empty names without '/', got {topic!r}, {what!r}")
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS / topic / f"{today}-{what}{suffix}"


def buffers_to_rotate(bytes_per_set: int, cap: int = 64) -> int:
    """How many distinct input sets to cycle through so that no replay is served from L2."""
    return max(2, min(cap, -(-L2_DEFEAT_BYTES // max(1, bytes_per_set))))


def copy_bandwidth(nbytes: int = 2 * 2**30, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def time_graph(calls: list[Callable[[], object]], replays: int = 50, use_graph: bool = True) -> float:
    """Median seconds per call: the calls (one per rotated buffer) are captured back to back in one
    CUDA graph, the graph is replayed ``replays`` times, each replay timed with events."""
    for fn in calls:  # compile / autotune / allocate outside capture
        fn()
    torch.cuda.synchronize()
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in calls:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        run = graph.replay
    else:
        def run() -> None:
            for fn in calls:
                fn()
    for _ in range(3):
        run()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3 / len(calls))
    return statistics.median(times)


def environment() -> dict:
    import triton

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        # the process-wide kernel switches (GLMTG_MMVQ_VARIANT, GLMTG_MMVQ_MOE_VARIANT, GLMTG_PDL ...): a
        # result names the variant it timed
        "glmtg_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GLMTG_")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                    l2_mb=getattr(props, "L2_cache_size", 0) / 2**20)
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    return info


def write_reports(payload: dict, stem: Path, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], None]) -> None:
    """stem.json (the payload), stem.md (``markdown(payload)``) and stem.png (``plot``; skipped with a note
    where matplotlib is missing)."""
    write_json(stem.with_suffix(".json"), payload)
    stem.with_suffix(".md").write_text(markdown(payload))
    try:
        plot(payload, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {stem}.json / .md / .png")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
