"""Random GGUF weight tensors with finite values, for the kernels that read GGUF blocks (GEMV, MoE).

Random bytes give every code bit pattern but also fp16 scales that are inf, NaN or huge, which would make
a matmul reference meaningless. So:
- formats gguf can quantize (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0): gguf.quants.quantize of random
  normal values (real scales, every code value occurs);
- the other types: random bytes with each fp16 scale field (offsets from ggml-common.h's block structs)
  overwritten by a modest random fp16 (|d| in [2^-6, 2^-4]), then any block whose values are still not
  finite (a type whose scale is not a plain field, e.g. iq1_m) is redrawn from random bytes.
"""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import torch

from glmtg.formats import REGISTRY

# Byte offsets of the fp16 scale fields (d, dmin, m) in one block, per type without a gguf quantizer.
FP16_SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
    "iq2_xxs": (0,), "iq2_xs": (0,), "iq2_s": (0,), "iq3_xxs": (0,), "iq3_s": (0,), "iq1_s": (0,),
    "iq4_nl": (0,), "iq4_xs": (0,), "tq1_0": (52,), "tq2_0": (64,),
}


def _quantizable(name: str) -> bool:
    return name in ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def gguf_weight(name: str, shape: tuple[int, ...], values: int, seed: int) -> torch.Tensor:
    """uint8 [*shape, row_bytes]: rows of ``values`` values in GGUF format ``name``, all finite."""
    f = REGISTRY[name]
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape)) if shape else 1
    nb = values // f.block_size
    if _quantizable(name):
        qtype = gguf.GGMLQuantizationType(f.gguf_type)
        data = rng.standard_normal((rows, values)).astype(np.float32)
        raw = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(data, qtype)).view(np.uint8).copy())
        return raw.reshape(*shape, nb * f.type_size)
    blocks = torch.from_numpy(rng.integers(0, 256, (rows * nb, f.type_size), dtype=np.uint8))
    for _ in range(100):
        for off in FP16_SCALE_OFFSETS.get(name, ()):
            mag = rng.uniform(2.0 ** -6, 2.0 ** -4, rows * nb) * rng.choice([-1.0, 1.0], rows * nb)
            blocks[:, off:off + 2] = torch.from_numpy(mag.astype(np.float16).view(np.uint8).reshape(-1, 2))
        bad = ~f.dequantize_blocks(blocks).isfinite().all(dim=-1)
        if not bad.any():
            return blocks.reshape(*shape, nb * f.type_size)
        fresh = rng.integers(0, 256, (int(bad.sum()), f.type_size), dtype=np.uint8)
        blocks[bad] = torch.from_numpy(fresh)
    raise AssertionError(f"could not draw finite {name} blocks")
