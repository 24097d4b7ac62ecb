"""A process-wide setting with a fixed set of modes, changed for the whole process or for one block.

Used by the launch-time switches that A/B comparisons flip (the fused decoder glue, programmatic
dependent launch): one place checks the mode and restores it after a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ModeSwitch:
    """``value`` is one of ``modes``; ``set`` checks (ValueError naming ``what``), ``scoped`` restores."""

    def __init__(self, what: str, modes: tuple[str, ...], value: str) -> None:
        self.what, self.modes = what, modes
        self.value = modes[0]
        self.set(value)

    def set(self, value: str) -> None:
        if value not in self.modes:
            raise ValueError(f"{self.what} must be one of {self.modes}, got {value!r}")
        self.value = value

    @contextmanager
    def scoped(self, value: str) -> Iterator[None]:
        """Run a block with mode ``value``, then restore the previous one."""
        before = self.value
        self.set(value)
        try:
            yield
        finally:
            self.value = before
