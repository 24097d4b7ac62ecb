"""How much memory a device has left, and the one check every allocation plan goes through.

Both the CLI (weights + KV cache, before building anything) and the engine (its KV cache) ask here,
so a request too large for the machine ends in one ValueError naming the sizes, never in an
allocator failure half-way through.
"""

from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device | str) -> int:
    """Memory that can still be allocated on ``device``: free GPU memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "meta":
        raise ValueError("the meta device has no memory to measure")
    return _host_available()


def _host_available() -> int:
    # MemAvailable counts reclaimable page cache, which "free" pages alone miss (a loaded model's
    # memory-mapped checkpoint sits there).
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, need_bytes: int, device: torch.device | str, hint: str = "") -> None:
    """Raise ValueError when ``need_bytes`` exceed what ``device`` has available (``what`` names the request)."""
    device = torch.device(device)
    free = available_bytes(device)
    if need_bytes > free:
        kind = "GPU" if device.type == "cuda" else "host (CPU)"
        raise ValueError(f"{what} needs {need_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB of {kind} memory "
                         f"is available" + (f"; {hint}" if hint else ""))
