"""The grid types (iq1/iq2/iq3): codebooks read lazily from gguf, and hand-built blocks with known values.

Bit-exactness against ``gguf.quants.dequantize`` for these types runs with every other GGUF type in
test_gguf_blocks.py; the cases here check what that comparison cannot: that importing glmtg does not import
gguf, and that decoding follows ggml's block layout and not merely gguf's numpy (values worked out by hand
from ggml's grids, exact, no tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from glmtg.formats import REGISTRY


def test_import_glmtg_does_not_import_gguf():
    code = ("import sys, glmtg, glmtg.formats; from glmtg.formats import REGISTRY; "
            "assert REGISTRY['iq2_xxs'].dequantize_blocks is not None; "
            "assert 'gguf' not in sys.modules, 'gguf imported eagerly'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _block(name: str, fields: dict[int, bytes]) -> torch.Tensor:
    raw = bytearray(REGISTRY[name].type_size)
    for off, data in fields.items():
        raw[off:off + len(data)] = data
    return torch.tensor(list(raw), dtype=torch.uint8)


ONE = np.float16(1.0).tobytes()


def test_iq3_s_zero_codes_are_grid_entry_zero():
    # iq3s_grid[0] = 0x01010101: every level 1; sub-scale 0 -> d * (1 + 2 * 0) = 1; signs clear
    out = REGISTRY["iq3_s"].dequantize_blocks(_block("iq3_s", {0: ONE}))
    assert torch.equal(out, torch.ones(256))
    # sign bit 5 of byte 3 (value 29) set, sub-scale nibble of the second 32 values = 1 (x3)
    out = REGISTRY["iq3_s"].dequantize_blocks(_block("iq3_s", {0: ONE, 74 + 3: bytes([1 << 5]), 106: bytes([0x10])}))
    want = torch.ones(256)
    want[29] = -1.0
    want[32:64] *= 3.0
    assert torch.equal(out, want)


def test_iq2_xxs_scale_and_ksigns_parity():
    # aux word 1 of the first 32 values: scale nibble 3 (db = (0.5 + 3) * 0.25 = 0.875), ksigns index 1 in
    # group 0: ksigns[1] = 0x81, signs on values 0 and 7 (the 8th sign restores even parity)
    word = (3 << 28) | 1
    out = REGISTRY["iq2_xxs"].dequantize_blocks(_block("iq2_xxs", {0: ONE, 2 + 4: word.to_bytes(4, "little")}))
    # iq2xxs_grid[0] = 0x0808080808080808: every level 8
    first = torch.full((32,), 0.875 * 8)
    first[[0, 7]] *= -1
    assert torch.equal(out[:32], first)
    assert torch.equal(out[32:], torch.full((224,), 0.125 * 8))


def test_iq1_m_scale_spread_over_nibbles():
    # d = 1.0 = 0x3C00: nibbles 0, 0, C, 3 into the top of scale words 0..3; sub-scales 0 -> 1 * d;
    # iq1s_grid[0] is all -1, delta +1/8 with the qh sign bit clear: every value -0.875
    words = np.array([0x0000, 0x0000, 0xC000, 0x3000], dtype=np.uint16).tobytes()
    out = REGISTRY["iq1_m"].dequantize_blocks(_block("iq1_m", {48: words}))
    assert torch.equal(out, torch.full((256,), -0.875))
