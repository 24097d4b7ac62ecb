"""The sweep-bench figure: S_TG and S_PP against cache depth, one line per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_runs(runs: list[tuple[str, list[dict[str, Any]]]], path: str | Path, title: str = "") -> None:
    """S_TG and S_PP vs N_KV, one line per run (label, rows as in the JSON)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tg, ax_pp) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in runs:
        n_kv = [r["n_kv"] for r in rows]
        ax_tg.plot(n_kv, [r["speed_tg"] for r in rows], marker="o", markersize=3, label=label)
        ax_pp.plot(n_kv, [r["speed_pp"] for r in rows], marker="o", markersize=3, label=label)
    for ax, what in ((ax_tg, "S_TG (generation)"), (ax_pp, "S_PP (prompt processing)")):
        ax.set_xlabel("N_KV (tokens in the cache)")
        ax.set_ylabel("tokens / s")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
