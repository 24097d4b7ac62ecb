"""Launcher of the CUDA decode-attention loop for quantized caches (cuda/decode_quant.cu).

The kernel ships prebuilt (cuda/decode_quant.fatbin: sm_90 machine code, built by
``python -m glmtg.kernels.attention.cuda.build`` with nvcc) and is loaded through the CUDA driver API with
ctypes, so glmtg needs neither a compiler nor a torch extension at run time. It writes the same
split partials as the Triton kernel, whose merge kernel then combines them (launch.decode_attention).

Scope: K and V both in q8_0, q4_0 or fp8, head_dim 128, 16 query rows (GQA group x new tokens) per
warp (more rows take more warps, each reading the slice again), fp16/bf16 queries, contiguous or paged
caches with power-of-two pages >= 16, 16-byte aligned and packed rows (codes and scales one row length
apart, as glmtg.kv_cache stores them). decode_attention() takes the Triton kernel wherever one of
these does not hold (usable()).
"""

from __future__ import annotations

import ctypes
import hashlib
import warnings
from pathlib import Path

import torch

from glmtg.formats import FORMATS, KernelCode
from glmtg.kernels._checks import device_index

CUDA_DIR = Path(__file__).parent / "cuda"
SOURCE = CUDA_DIR / "decode_quant.cu"
FATBIN = CUDA_DIR / "decode_quant.fatbin"
STAMP = CUDA_DIR / "decode_quant.fatbin.sha256"  # sha256 of the source the fatbin was built from
# The loop's formats: its kernels are compiled per (K code, V code), as the .cu's enum Format names them.
LOOP_CODES = (KernelCode.Q8_0, KernelCode.Q4_0, KernelCode.FP8)
HEAD_DIM = 128
ROWS = 16  # query rows per warp; a launch covers rows in ceil(rows / ROWS) row tiles (grid z)
MAX_ROWS = 4 * ROWS  # row tiles re-read the slice; GPU-tested up to 36 rows, planned up to 32 (48/2: 24)
TILE = 16  # tokens per step; slices are cut in multiples of it (the merge kernel must agree)
CARVEOUT = 100  # percent of on-chip memory preferred as shared memory


class _Params(ctypes.Structure):
    # Mirrors struct Params in decode_quant.cu (natural C alignment on both sides).
    _fields_ = [
        *[(name, ctypes.c_void_p) for name in
          ("q", "k", "v", "k_scale", "v_scale", "partial_o", "partial_lse", "lengths", "page_table")],
        *[(name, ctypes.c_longlong) for name in
          ("stride_qb", "stride_qs", "stride_qh", "stride_kp", "stride_kh", "stride_kn",
           "stride_vp", "stride_vh", "stride_vn", "stride_ksp", "stride_ksh", "stride_ksn",
           "stride_vsp", "stride_vsh", "stride_vsn", "stride_pt_b")],
        ("scale_log2", ctypes.c_float),
        *[(name, ctypes.c_int) for name in
          ("capacity", "num_splits", "sq", "group", "num_kv_heads", "page_shift", "q_bf16")],
    ]


class Driver:
    """The few driver-API calls needed: load a fatbin once per device, launch on torch's stream.

    ``image`` (default: the shipped fatbin) and ``carveout`` (percent of on-chip memory preferred as
    shared memory; -1 leaves the driver's choice) let bench/cuda_variants.py time build variants
    side by side through :func:`use_driver`.
    """

    def __init__(self, image: bytes | None = None, carveout: int = CARVEOUT) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.image = image if image is not None else FATBIN.read_bytes()
        # The loop uses no shared memory, so all of it may stay L1 (bench/DECISIONS.md).
        self.carveout = carveout
        self.functions: dict[tuple[int, str], ctypes.c_void_p] = {}

    def _call(self, name: str, *args: object) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(text))
            raise RuntimeError(f"{name} failed: {text.value.decode() if text.value else result}")

    def function(self, device: int, name: str) -> ctypes.c_void_p:
        key = (device, name)
        if key not in self.functions:
            with torch.cuda.device(device):
                torch.cuda.current_stream()  # makes the device's primary context current here
                module = ctypes.c_void_p()
                self._call("cuModuleLoadData", ctypes.byref(module), self.image)
                fn = ctypes.c_void_p()
                self._call("cuModuleGetFunction", ctypes.byref(fn), module, name.encode())
                if self.carveout >= 0:
                    self._call("cuFuncSetAttribute", fn, ctypes.c_int(_ATTR_CARVEOUT), ctypes.c_int(self.carveout))
            self.functions[key] = fn
        return self.functions[key]

    def resident_per_sm(self, device: int, name: str) -> int:
        """Programs of one warp that fit on one SM at once (registers and shared memory)."""
        count = ctypes.c_int()
        self._call("cuOccupancyMaxActiveBlocksPerMultiprocessor", ctypes.byref(count),
                   self.function(device, name), ctypes.c_int(32), ctypes.c_size_t(0))
        return count.value

    def launch(self, device: int, name: str, grid: tuple[int, int, int], params: _Params) -> None:
        fn = self.function(device, name)
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        self._call("cuLaunchKernel", fn, *[ctypes.c_uint(x) for x in grid], ctypes.c_uint(32), ctypes.c_uint(1),
                   ctypes.c_uint(1), ctypes.c_uint(0), stream, args, None)


_ATTR_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
_DRIVER: Driver | None = None
_AVAILABLE: dict[int, bool] = {}


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def available(device: torch.device) -> bool:
    """True where the prebuilt kernel can run: a CUDA device of compute capability 9.x (Hopper) whose
    driver loads the fatbin (built with CUDA 13.0); otherwise decode_attention() uses Triton."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device_index(device)
    if index not in _AVAILABLE:
        ok = torch.cuda.get_device_capability(index)[0] == 9 and FATBIN.exists() and torch.version.hip is None
        if ok:
            try:  # e.g. a driver older than the CUDA 13.0 toolkit that built the fatbin
                _driver().function(index, kernel_name("q4_0", "q4_0", False))
            except (OSError, RuntimeError) as exc:
                warnings.warn(f"glmtg: the CUDA decode loop cannot load ({exc}); using the Triton kernel",
                              RuntimeWarning, stacklevel=2)
                ok = False
        _AVAILABLE[index] = ok
    return _AVAILABLE[index]


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
             v_scale: torch.Tensor | None, k_format: str | None, v_format: str | None,
             page_size: int | None) -> bool:
    """Whether these (already validated) arguments fit the kernel's scope (module docstring)."""
    if any(f not in FORMATS or FORMATS[f].code not in LOOP_CODES for f in (k_format, v_format)):
        return False
    if q.shape[0] * k_cache.shape[1] > 65535:  # grid y
        return False
    if q.shape[3] != HEAD_DIM or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[1] * (q.shape[2] // k_cache.shape[1]) > MAX_ROWS:
        return False
    if page_size is not None and (page_size < TILE or page_size & (page_size - 1)):
        return False
    if k_cache.shape[2] * max(k_cache.shape[3], v_cache.shape[3], 8) >= 2**31:  # tile offsets are 32-bit
        return False
    if q.data_ptr() % 16 or any(s % 8 for s in q.stride()[:3]):  # 16-byte query row loads
        return False
    for data in (k_cache, v_cache):
        # Packed rows: the kernel steps through a tile's rows at the row length, a compile-time constant.
        if data.data_ptr() % 16 or any(s % 16 for s in data.stride()[:3]) or data.stride(2) != data.shape[3]:
            return False
    for scale, fmt in ((k_scale, k_format), (v_scale, v_format)):
        row_scaled = FORMATS[fmt].row_scaled
        if scale.data_ptr() % scale.element_size() or scale.stride(2) != (1 if row_scaled else scale.shape[3]):
            return False
        if not row_scaled and scale.stride(3) != 1:
            return False
    return True


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
           v_scale: torch.Tensor | None, k_format: str | None, v_format: str | None,
           page_size: int | None) -> bool:
    """Whether the kernel can run these (already validated) arguments here: in scope and loadable."""
    return (supports(q, k_cache, v_cache, k_scale, v_scale, k_format, v_format, page_size)
            and available(q.device))


def _driver() -> Driver:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = Driver()
    return _DRIVER


def use_driver(driver: Driver | None) -> Driver | None:
    """Launch through ``driver`` from now on (None: the shipped fatbin again); returns the previous one.
    For benchmarks of build variants (bench/cuda_variants.py)."""
    global _DRIVER
    previous, _DRIVER = _DRIVER, driver
    return previous


def kernel_name(k_format: str, v_format: str, paged: bool) -> str:
    """The fatbin's kernel for these formats: named by their kernel codes, as decode_quant.cu names them."""
    return f"glmtg_decode_quant_k{int(FORMATS[k_format].code)}_v{int(FORMATS[v_format].code)}_p{int(paged)}"


def resident_per_sm(device: torch.device, k_format: str, v_format: str, paged: bool = False) -> int:
    """How many of the kernel's one-warp programs one SM holds at once (for planning and reports)."""
    return _driver().resident_per_sm(device_index(device), kernel_name(k_format, v_format, paged))


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
           v_scale: torch.Tensor, k_format: str, v_format: str, lengths: torch.Tensor,
           page_table: torch.Tensor | None, partial_o: torch.Tensor, partial_lse: torch.Tensor,
           *, scale_log2: float, capacity: int, num_splits: int) -> None:
    """Write the partials of every (slice, sequence, KV head); arguments as checked by decode_attention."""
    batch, sq, num_q_heads, _ = q.shape
    num_kv_heads = k_cache.shape[1]
    page_size = k_cache.shape[2] if page_table is not None else None
    params = _Params(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
        partial_o.data_ptr(), partial_lse.data_ptr(), lengths.data_ptr(),
        page_table.data_ptr() if page_table is not None else lengths.data_ptr(),
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *k_scale.stride()[:3], *v_scale.stride()[:3],  # the token-row strides (fp8 scales have no more)
        page_table.stride(0) if page_table is not None else 0,
        scale_log2, capacity, num_splits, sq, num_q_heads // num_kv_heads, num_kv_heads,
        page_size.bit_length() - 1 if page_size else 0, int(q.dtype == torch.bfloat16),
    )
    name = kernel_name(k_format, v_format, page_table is not None)
    m_tiles = partial_o.shape[2] // ROWS  # the partials' row pitch is m_tiles * ROWS
    _driver().launch(device_index(q.device), name, (num_splits, batch * num_kv_heads, m_tiles), params)
