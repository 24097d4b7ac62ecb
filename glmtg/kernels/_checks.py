"""Argument checks shared by the kernel launchers: one copy, so every launcher reports bad input alike."""

from __future__ import annotations

from typing import Callable

import torch


def check(cond: object, message: str | Callable[[], str]) -> None:
    """Raise ValueError(message) unless ``cond``.

    ``message`` may be a callable, called only on failure: launchers that run every decode step pass
    lambdas, so that formatting shapes costs nothing when the arguments are fine.
    """
    if not cond:
        raise ValueError(message() if callable(message) else message)


def check_power_of_two(name: str, value: object) -> None:
    """ValueError naming ``name`` unless ``value`` is an int power of two (the launchers' block knobs)."""
    check(isinstance(value, int) and value >= 1 and value & (value - 1) == 0,
          lambda: f"{name} must be a power of two, got {value!r}")


def shape(t: object) -> str:
    """A tensor's shape as a tuple, or the type of a non-tensor."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def describe(t: object) -> str:
    """dtype, shape and device of a tensor, or the repr of anything else (shortened)."""
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)} on {t.device}"
    text = repr(t)
    return text if len(text) <= 80 else text[:77] + "..."


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream (host reads must wait)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` ("cuda" alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()
