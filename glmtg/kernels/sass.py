"""Reading compiled kernels: the instructions of a function's hot loop, from nvdisasm's SASS text.

Used by ``bench/inspect_kernel.py`` and by a CPU test of the shipped CUDA loop, which check what the
compiler made of a kernel (no GPU needed: Triton ships nvdisasm).
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
_TARGET = re.compile(r"(\.L_x_\d+)")


def longest_loop(sass: str) -> list[str]:
    """Opcodes (with their modifiers, e.g. ``LDG.E.128``) of the longest loop of one function's SASS text:
    the span of its longest backward branch. Empty where the function has no loop."""
    labels: dict[str, int] = {}
    ops: list[tuple[int, str, str]] = []  # (address, opcode, line)
    pending: list[str] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTRUCTION.search(line)
        if m:
            address = int(m.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            ops.append((address, m.group(2), line))
    spans = [(labels[t.group(1)], address) for address, op, line in ops if op.startswith("BRA")
             for t in [_TARGET.search(line)] if t and labels.get(t.group(1), address) < address]
    if not spans:
        return []
    lo, hi = max(spans, key=lambda span: span[1] - span[0])
    return [op for address, op, _ in ops if lo <= address <= hi]
