"""GGUF reader: round trips through the gguf package's writer, split sets, llama.cpp's malformed-file
classes (tests/test-gguf.cpp), truncation at every structure boundary, and a seeded mutation fuzz.

Malformed files are written byte by byte here (``_File``) so that each field can be broken on its own;
valid files also come from ``gguf.GGUFWriter`` so the reader is checked against the reference writer.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from glmtg.formats.ggml_types import GGML_TYPE_IDS, GGML_TYPES
from glmtg.loading.gguf import GGUFError, GGUFFile, open_gguf

Q = gguf.GGMLQuantizationType
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


# ---------------------------------------------------------------- byte-level writer
def u32(x: int) -> bytes:
    return struct.pack("<I", x & 0xFFFFFFFF)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x & 0xFFFFFFFFFFFFFFFF)


def s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + u32(vtype) + payload


def tinfo(name: str | bytes, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return s(name) + u32(len(ne)) + b"".join(struct.pack("<q", d) for d in ne) + u32(ggml_type) + u64(offset)


def nbytes_of(ne: list[int], ggml_type: int) -> int:
    t = GGML_TYPES[ggml_type]
    return int(np.prod(ne, dtype=object)) // t.block_size * t.type_size


class _File:
    """A GGUF file assembled from parts; ``boundaries`` are the offsets where each structure ends."""

    def __init__(self, kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF",
                 version: int = 3, n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32):
        out = bytearray(magic + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
                        + u64(len(kvs) if n_kv is None else n_kv))
        self.boundaries = [4, 8, 16, 24]
        for part in kvs + infos:
            out += part
            self.boundaries.append(len(out))
        out += bytes(-len(out) % alignment)
        self.data_offset = len(out)
        self.boundaries.append(len(out))
        out += data
        self.bytes = bytes(out)


def laid_out(specs: list[tuple[str, list[int], int]], alignment: int = 32, seed: int = 0):
    """Tensor infos at consecutive aligned offsets plus a data section of seeded random bytes."""
    rng = np.random.default_rng(seed)
    infos, data, placed = [], bytearray(), []
    for name, ne, t in specs:
        data += bytes(-len(data) % alignment)
        infos.append(tinfo(name, ne, t, len(data)))
        blob = rng.integers(0, 256, nbytes_of(ne, t), dtype=np.uint8).tobytes()
        placed.append((name, len(data), blob))
        data += blob
    return infos, bytes(data), placed


BASE_KVS = [
    kv("general.architecture", STR, s("glm4moe")),
    kv("glm4moe.block_count", U32, u32(47)),
    kv("tokenizer.ggml.tokens", ARR, u32(STR) + u64(3) + s("a") + s("Ġb") + s("")),
    kv("tokenizer.ggml.scores", ARR, u32(F32) + u64(2) + struct.pack("<2f", 0.5, -1.0)),
]
BASE_TENSORS = [("tok.f32", [8, 3], 0), ("blk.0.q8", [64, 2], 8), ("blk.0.q4k", [256], 12), ("w.f16", [5, 1, 2], 1)]


def base_file(alignment: int = 32) -> _File:
    infos, data, _ = laid_out(BASE_TENSORS, alignment)
    kvs = BASE_KVS + ([kv("general.alignment", U32, u32(alignment))] if alignment != 32 else [])
    return _File(kvs, infos, data, alignment=alignment)


def write(tmp_path, data: bytes, name: str = "m.gguf") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def check_open(path: str) -> GGUFFile:
    """Open a file and check the invariants a clean open promises, whatever the file was."""
    f = open_gguf(path)
    sizes = [os.path.getsize(p) for p in f.paths]
    spans = []
    for name, t in f.tensors.items():
        assert t.name == name and isinstance(name, str)
        assert t.shape == t.ne[::-1] and 1 <= len(t.ne) <= 4 and all(d >= 0 for d in t.ne)
        assert t.nbytes == nbytes_of(list(t.ne), t.ggml_type) and GGML_TYPES[t.ggml_type].name == t.type_name
        assert 0 <= t.part < len(sizes) and 0 <= t.offset and t.offset + t.nbytes <= sizes[t.part]
        assert f.tensor_bytes(name).size == t.nbytes
        if t.nbytes:
            spans.append((t.part, t.offset, t.offset + t.nbytes))
    spans.sort()
    assert all(a[0] < b[0] or a[2] <= b[1] for a, b in itertools.pairwise(spans))
    assert all(isinstance(k, str) and k for k in f.metadata)
    return f


def expect_error(path: str, match: str, at: str | None = None) -> str:
    """Opening ``path`` fails with one line that starts with the file at fault (``at``, default ``path``)."""
    with pytest.raises(GGUFError, match=match) as e:
        open_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith((at or path) + ":"), msg
    return msg


# ---------------------------------------------------------------- tables and round trips
def test_type_table_matches_gguf_package():
    theirs = {int(t): (t.name, *gguf.constants.GGML_QUANT_SIZES[t]) for t in Q}
    ours = {i: tuple(t) for i, t in GGML_TYPES.items()}
    assert ours == theirs
    assert GGML_TYPE_IDS["Q4_K"] == 12 and 4 not in GGML_TYPES


def _writer_file(path: str, rng: np.random.Generator, **writer_kw):
    w = gguf.GGUFWriter(path, "glm4moe", **writer_kw)
    meta = {
        "u8": (w.add_uint8, 255), "i8": (w.add_int8, -128), "u16": (w.add_uint16, 65535),
        "i16": (w.add_int16, -32768), "u32": (w.add_uint32, 2**32 - 1), "i32": (w.add_int32, -(2**31)),
        "u64": (w.add_uint64, 2**64 - 1), "i64": (w.add_int64, -(2**63)), "f32": (w.add_float32, 0.1),
        "f64": (w.add_float64, 0.1), "bool": (w.add_bool, True), "str": (w.add_string, "GLM ✓ 中文"),
        "strs": (w.add_array, ["<|endoftext|>", "Ġthe", "é", "x" * 300]),
        "ints": (w.add_array, [1, -2, 3]), "floats": (w.add_array, [0.5, -1.25]),
        "bools": (w.add_array, [True, False, True]), "nested": (w.add_array, [[1, 2], [3], [4, 5, 6]]),
        "nested_strs": (w.add_array, [["a", "b"], ["ccc"]]),
    }
    for key, (add, value) in meta.items():
        add(f"test.{key}", value)
    tensors = {}
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    tensors["f32"] = (f32, None, f32)
    f16 = rng.standard_normal((2, 5, 7)).astype(np.float16)
    tensors["f16"] = (f16, None, f16)
    for qt, shape in ((Q.Q8_0, (3, 96)), (Q.Q4_0, (5, 32))):
        blocks = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qt)
        tensors[qt.name.lower()] = (blocks, qt, blocks)
    q4k = rng.integers(0, 256, (2, 2 * 144), dtype=np.uint8)  # raw Q4_K blocks: the reader never decodes
    tensors["q4_k"] = (q4k, Q.Q4_K, q4k)
    for name, (arr, qt, _) in tensors.items():
        w.add_tensor(f"blk.0.{name}", arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return meta, tensors


def test_round_trip_through_gguf_writer(tmp_path):
    path = str(tmp_path / "rt.gguf")
    meta, tensors = _writer_file(path, np.random.default_rng(1))
    ref = gguf.GGUFReader(path)
    with check_open(path) as f:
        assert f.version == 3 and f.alignment == 32 and f.paths == [path]
        assert f.metadata["general.architecture"] == "glm4moe"
        for key, (_, value) in meta.items():
            got = f.metadata[f"test.{key}"]
            if key == "f32":
                assert got == float(np.float32(value))
            elif key in ("nested", "nested_strs"):
                assert [list(x) for x in got] == value
            elif isinstance(value, list):
                assert list(got) == value
            else:
                assert got == value and type(got) is type(value)
        assert f.kv_types["test.strs"] == (ARR, STR) and f.kv_types["test.nested"] == (ARR, ARR)
        assert f.metadata["test.ints"].dtype == np.int32 and f.metadata["test.bools"].dtype == bool
        assert sorted(f.tensors) == sorted(f"blk.0.{n}" for n in tensors)
        for t in ref.tensors:  # the gguf package's own reader is the reference for placement and shape
            info = f.tensors[t.name]
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert info.ne == tuple(int(d) for d in t.shape) and info.ggml_type == int(t.tensor_type)
        for name, (arr, qt, raw) in tensors.items():
            info = f.tensors[f"blk.0.{name}"]
            assert info.type_name == (qt.name if qt is not None else {np.float32: "F32", np.float16: "F16"}[arr.dtype.type])
            view = f.tensor_bytes(info.name)
            assert not view.flags.writeable
            assert np.array_equal(view, np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
        assert f.tensors["blk.0.f16"].shape == (2, 5, 7) and f.tensors["blk.0.f16"].ne == (7, 5, 2)
        assert f.tensors["blk.0.q4_k"].shape == (2, 512)
        kept = f.tensor_bytes("blk.0.f32")
    assert np.array_equal(kept.view(np.float32).reshape(3, 64), tensors["f32"][0])  # a view outlives close()
    with pytest.raises(GGUFError, match="closed"):
        f.tensor_bytes("blk.0.f32")


def test_handcrafted_file_and_version_2(tmp_path):
    for version in (2, 3):
        fb = _File(BASE_KVS, *laid_out(BASE_TENSORS)[:2], version=version)
        with check_open(write(tmp_path, fb.bytes)) as f:
            assert f.version == version
            assert f.metadata["tokenizer.ggml.tokens"] == ["a", "Ġb", ""]
            assert f.metadata["tokenizer.ggml.scores"].tolist() == [0.5, -1.0]
            for name, off, blob in laid_out(BASE_TENSORS)[2]:
                assert f.tensors[name].offset == fb.data_offset + off
                assert f.tensor_bytes(name).tobytes() == blob
        with pytest.raises(GGUFError, match="no tensor named 'nope'"):
            f2 = open_gguf(write(tmp_path, fb.bytes))
            try:
                f2.tensor_bytes("nope")
            finally:
                f2.close()


# ---------------------------------------------------------------- split files
def _split_set(tmp_path, rng):
    path = tmp_path / "model.gguf"
    _, tensors = _writer_file(str(path), rng, split_max_tensors=2)
    return [str(tmp_path / f"model-{i:05d}-of-00003.gguf") for i in (1, 2, 3)], tensors


def test_split_set_merges_parts(tmp_path):
    paths, tensors = _split_set(tmp_path, np.random.default_rng(2))
    assert all(os.path.exists(p) for p in paths)
    with check_open(paths[0]) as f:
        assert f.paths == paths and f.metadata["split.count"] == 3
        assert sorted(f.tensors) == sorted(f"blk.0.{n}" for n in tensors)
        assert sorted({t.part for t in f.tensors.values()}) == [0, 1, 2]
        for name, (_, _, raw) in tensors.items():
            assert np.array_equal(f.tensor_bytes(f"blk.0.{name}"), np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    expect_error(paths[1], "part 2 of 3; open part 1")


def _patch_key(path: str, key: str, fmt: str, value) -> None:
    """Overwrite the scalar value of ``key`` in place (the key is followed by its 4-byte type)."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(s(key)) + len(s(key)) + 4
    struct.pack_into(fmt, data, at, value)
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("case, match, at", [
    ("missing part", "cannot open", 2),
    ("count", "key 'split.count'.*part 1 says 3", 1),
    ("no", "key 'split.no'.*this is part 2", 1),
    ("tensors count", "key 'split.tensors.count': 7 but the 3 parts hold 5 tensors", 0),
    ("tensors count differs", "key 'split.tensors.count': 6 but part 1 says 5", 1),
    ("renamed", "name is not NAME-00001-of-00003.gguf", None),
    ("duplicate tensor", "also in .*model-00002-of-00003.gguf", 2),
])
def test_split_set_mismatches(tmp_path, case, match, at):
    paths, _ = _split_set(tmp_path, np.random.default_rng(3))
    first = paths[0]
    if case == "missing part":
        os.remove(paths[2])
    elif case == "count":
        _patch_key(paths[1], "split.count", "<H", 4)
    elif case == "no":
        _patch_key(paths[1], "split.no", "<H", 2)
    elif case == "tensors count":
        for p in paths:
            _patch_key(p, "split.tensors.count", "<i", 7)
    elif case == "tensors count differs":
        _patch_key(paths[1], "split.tensors.count", "<i", 6)
    elif case == "renamed":
        first = str(tmp_path / "renamed.gguf")
        os.rename(paths[0], first)
    elif case == "duplicate tensor":  # give part 3's tensor the name of one in part 2
        with open_gguf(paths[0]) as f:
            by_part = {t.part: n for n, t in sorted(f.tensors.items())}
        data = Path(paths[2]).read_bytes()
        old, new = s(by_part[2]), s(by_part[1])
        assert len(old) == len(new)  # a same-length rename keeps every offset in the file valid
        Path(paths[2]).write_bytes(data.replace(old, new))
    expect_error(first, match, None if at is None else paths[at])


def test_split_name_without_split_keys(tmp_path):
    path = write(tmp_path, base_file().bytes, "m-00001-of-00002.gguf")
    expect_error(path, "no 'split.count' key")


# ---------------------------------------------------------------- llama.cpp's malformed-file classes
def _with_tensors(specs, *, kvs=None, alignment=32, layout_alignment=None, data_delta=0, **kw):
    infos, data, _ = laid_out(specs, layout_alignment or alignment)
    data = data[: len(data) + data_delta] if data_delta < 0 else data
    return _File(BASE_KVS if kvs is None else kvs, infos, data, alignment=alignment, **kw).bytes


def _align_kv(value: int, vtype: int = U32) -> bytes:
    return kv("general.alignment", vtype, u32(value))


ONE = [("t0", [32, 2], 0)]
BIG_NE = 4 * (2**31 - 1)
# name -> (file bytes, message pattern); names follow handcrafted_file_type in llama.cpp's tests/test-gguf.cpp
MALFORMED = {
    "HEADER_BAD_MAGIC": (_File([], [], magic=b"FUGG").bytes, "bad magic"),
    "HEADER_BAD_VERSION_0": (_File([], [], version=0).bytes, "unsupported GGUF version 0"),
    "HEADER_BAD_VERSION_1": (_File([], [], version=1).bytes, "unsupported GGUF version 1"),
    "HEADER_BAD_VERSION_FUTURE": (_File([], [], version=4).bytes, "unsupported GGUF version 4"),
    "HEADER_BIG_ENDIAN": (_File([], [], version=3 << 24).bytes, "big-endian"),
    "HEADER_BAD_N_TENSORS": (_File([], [], n_tensors=2**64 - 1).bytes, "tensor count.*cannot fit"),
    "HEADER_BAD_N_KV": (_File([], [], n_kv=2**64 - 1).bytes, "KV count.*cannot fit"),
    "HEADER_SHORT": (b"GGUF" + u32(3), "shorter than a GGUF header"),
    "KV_BAD_KEY_SIZE": (_File([u64(2**64 - 1) + b"k" + u32(U8) + b"\0" * 16], []).bytes, "key of KV #0: string length"),
    "KV_EMPTY_KEY": (_File([kv("", U8, b"\1")], []).bytes, "empty key"),
    "KV_BAD_UTF8_KEY": (_File([kv(b"bad\xff", U8, b"\1")], []).bytes, "not valid UTF-8"),
    "KV_BAD_TYPE": (_File([kv("k", 13, b"\0" * 8)], []).bytes, "key 'k': unknown value type 13"),
    "KV_BAD_ARRAY_TYPE": (_File([kv("k", ARR, u32(13) + u64(1) + b"\0" * 8)], []).bytes, "unknown array element type 13"),
    "KV_BAD_STRING_SIZE": (_File([kv("k", STR, u64(2**63) + b"abc")], []).bytes, "key 'k': string length"),
    "KV_BAD_ARRAY_SIZE": (_File([kv("k", ARR, u32(U64) + u64(2**61) + b"\0" * 16)], []).bytes, "cannot fit"),
    "KV_BAD_STRING_ARRAY_SIZE": (_File([kv("k", ARR, u32(STR) + u64(2**62) + b"\0" * 16)], []).bytes, "strings cannot fit"),
    "KV_BAD_NESTED_ARRAY_SIZE": (_File([kv("k", ARR, u32(ARR) + u64(2**62) + b"\0" * 16)], []).bytes, "arrays cannot fit"),
    "KV_DEEP_NESTING": (_File([kv("k", ARR, (u32(ARR) + u64(1)) * 6 + u32(U8) + u64(0))], []).bytes, "nested deeper"),
    "KV_BAD_VALUE_UTF8": (_File([kv("k", ARR, u32(STR) + u64(2) + s("ok") + s(b"\xc3("))], []).bytes, r"key 'k'\[1\]: .*UTF-8"),
    "KV_DUPLICATE_KEY": (_File([kv("k", U8, b"\1"), kv("k", U8, b"\2")], []).bytes, "key 'k': duplicate key"),
    "KV_BAD_ALIGN": (_File([_align_kv(13)], []).bytes, "general.alignment.*13 is not a power of two"),
    "KV_ZERO_ALIGN": (_File([_align_kv(0)], []).bytes, "0 is not a power of two"),
    "KV_WRONG_TYPE_ALIGN": (_File([_align_kv(32, I32)], []).bytes, "must be UINT32, not INT32"),
    "TENSORS_BAD_NAME_SIZE": (_File([], [tinfo("t" * 64, [32], 0, 0)]).bytes, "name longer than 63 bytes"),
    "TENSORS_EMPTY_NAME": (_File([], [tinfo("", [32], 0, 0)]).bytes, "empty name"),
    "TENSORS_BAD_N_DIMS": (_File([], [tinfo("t", [1, 1, 1, 1, 1], 0, 0)]).bytes, "n_dims 5 is not in 1..4"),
    "TENSORS_ZERO_N_DIMS": (_File([], [tinfo("t", [], 0, 0)]).bytes, "n_dims 0"),
    "TENSORS_BAD_SHAPE": (_File([], [tinfo("t", [-1, -1], 0, 0)]).bytes, "negative dimension"),
    "TENSORS_NE_TOO_BIG": (_File([], [tinfo("t", [BIG_NE, BIG_NE], 0, 0)]).bytes, "overflows int64"),
    "TENSORS_NBYTES_TOO_BIG": (_File([], [tinfo("t", [2**31, 2**30 + 2**25], 27, 0)]).bytes, "outside the file"),
    "TENSORS_BAD_TYPE": (_File([], [tinfo("t", [32], 42, 0)]).bytes, "unknown ggml type 42"),
    "TENSORS_RETIRED_TYPE": (_File([], [tinfo("t", [32], 4, 0)]).bytes, "unknown ggml type 4"),
    "TENSORS_BAD_BLOCK": (_File([], [tinfo("t", [48], 8, 0)]).bytes, "ne.0.=48 is not a multiple of Q8_0's block size 32"),
    "TENSORS_BAD_OFFSET": (_File([], [tinfo("t", [8], 0, 2**64 - 1)], b"\0" * 32).bytes, "data offset"),
    "TENSORS_FAR_OFFSET": (_File([], [tinfo("t", [8], 0, 2**63)], b"\0" * 32).bytes, "outside the file"),
    "TENSORS_DUPLICATE_NAME": (_File([], [tinfo("t", [8], 0, 0), tinfo("t", [8], 0, 32)], b"\0" * 64).bytes,
                               "tensor 't': duplicate tensor name"),
    "TENSORS_BAD_ALIGN": (_with_tensors(ONE, kvs=[_align_kv(13)], layout_alignment=32), "13 is not a power of two"),
    "TENSORS_INCONSISTENT_ALIGN": (_with_tensors([("a", [1], 24), ("b", [1], 24)], layout_alignment=1),
                                   "tensor 'b': data offset 1 is not a multiple of the alignment 32"),
    "TENSORS_OVERLAP": (_File([], [tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], b"\0" * 64).bytes, "overlaps tensor"),
    "TENSORS_OVERLAP_SAME_OFFSET": (_File([], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 0)], b"\0" * 32).bytes, "overlaps"),
    "DATA_NOT_ENOUGH_DATA": (_with_tensors(BASE_TENSORS, data_delta=-1), "tensor 'w.f16': data .* outside the file"),
    "DATA_MISSING": (_File([], [tinfo("t", [8], 0, 0)]).bytes[:60], "data section.*past the end"),
    "DATA_BAD_ALIGN": (_with_tensors(BASE_TENSORS, kvs=[_align_kv(13)], layout_alignment=32), "not a power of two"),
    "DATA_INCONSISTENT_ALIGN": (_with_tensors([("a", [3], 24), ("b", [5], 24)], layout_alignment=1), "not a multiple"),
    "DATA_MEM_SIZE_OVERFLOW": (_File([], [tinfo("a", [0x7FFFFFFFFFFFFFC0], 24, 0),
                                          tinfo("b", [0x7FFFFFFFFFFFFFC0], 24, 0x7FFFFFFFFFFFFFC0)], bytes(range(32))).bytes,
                               "outside the file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_class(tmp_path, case):
    data, match = MALFORMED[case]
    expect_error(write(tmp_path, data), match)


VALID = {  # llama.cpp's *_SUCCESS / *_CUSTOM_ALIGN / ZERO_DIM classes: these must open
    "HEADER_EMPTY": (_File([], []).bytes, 0, 0),
    "KV_SUCCESS": (_File(BASE_KVS, []).bytes, len(BASE_KVS), 0),
    "TENSORS_ZERO_DIM": (_File([], [tinfo("t", [32, 0], 8, 0)]).bytes, 0, 1),
    "TENSORS_CUSTOM_ALIGN": (_with_tensors(BASE_TENSORS, kvs=BASE_KVS + [_align_kv(1)], alignment=1),
                             len(BASE_KVS) + 1, len(BASE_TENSORS)),
    "DATA_SUCCESS": (base_file().bytes, len(BASE_KVS), len(BASE_TENSORS)),
    "DATA_CUSTOM_ALIGN": (base_file(64).bytes, len(BASE_KVS) + 1, len(BASE_TENSORS)),
    "DATA_TRAILING_BYTES": (base_file().bytes + b"\0" * 100, len(BASE_KVS), len(BASE_TENSORS)),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_file_class(tmp_path, case):
    data, n_kv, n_tensors = VALID[case]
    with check_open(write(tmp_path, data)) as f:
        assert (len(f.metadata), len(f.tensors)) == (n_kv, n_tensors)
        if case == "TENSORS_ZERO_DIM":
            assert f.tensors["t"].nbytes == 0 and f.tensor_bytes("t").size == 0


def test_missing_empty_and_directory(tmp_path):
    expect_error(str(tmp_path / "absent.gguf"), "cannot open")
    expect_error(write(tmp_path, b""), "file of 0 bytes is shorter than a GGUF header")
    expect_error(str(tmp_path), "cannot open")


@pytest.mark.parametrize("case", ["HEADER_BAD_N_KV", "HEADER_BAD_N_TENSORS", "KV_BAD_STRING_SIZE", "KV_BAD_ARRAY_SIZE",
                                  "KV_BAD_STRING_ARRAY_SIZE", "KV_BAD_NESTED_ARRAY_SIZE", "DATA_MEM_SIZE_OVERFLOW"])
def test_huge_counts_allocate_nothing(tmp_path, case):
    path = write(tmp_path, MALFORMED[case][0])
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            open_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


# ---------------------------------------------------------------- truncation and mutation fuzz
def test_truncation_at_every_boundary_and_random_points(tmp_path):
    fb = base_file()
    size = len(fb.bytes)
    rng = random.Random(15)
    cuts = sorted(set(fb.boundaries) | {b - 1 for b in fb.boundaries} | {rng.randrange(size) for _ in range(50)})
    cuts = [c for c in cuts if 0 <= c < size]
    assert len(cuts) >= 50 + len(BASE_KVS) + len(BASE_TENSORS)
    path = str(tmp_path / "cut.gguf")
    for cut in cuts:
        write(tmp_path, fb.bytes[:cut], "cut.gguf")
        with pytest.raises(GGUFError) as e:
            open_gguf(path)
        assert "\n" not in str(e.value)
    with check_open(write(tmp_path, fb.bytes, "whole.gguf")) as f:  # and the uncut file is fine
        assert len(f.tensors) == len(BASE_TENSORS)


INTERESTING = [0, 1, 2**7, 2**8 - 1, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]


def mutate(data: bytes, rng: random.Random, hot_end: int) -> bytes:
    """1-4 random edits: a bit flip, a random byte, or an interesting 4/8-byte integer; most land before hot_end."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(hot_end if rng.random() < 0.9 else len(out))
        kind = rng.randrange(3)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.randrange(256)
        else:
            width = rng.choice((4, 8))
            value = rng.choice(INTERESTING + [rng.randrange(len(out) * 2)]) % (1 << (8 * width))
            chunk = value.to_bytes(width, "little")
            out[pos : pos + width] = chunk[: len(out) - pos]
    return bytes(out)


def test_mutation_fuzz(tmp_path):
    path = str(tmp_path / "seed.gguf")
    _writer_file(path, np.random.default_rng(4))
    seed = Path(path).read_bytes()
    with open_gguf(path) as f:
        hot_end = min(t.offset for t in f.tensors.values())
    rng = random.Random(1415)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        write(tmp_path, mutate(seed, rng, hot_end), "mutant.gguf")
        try:
            check_open(str(tmp_path / "mutant.gguf")).close()
            outcomes["ok"] += 1
        except GGUFError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes  # both sides of the fuzz were exercised
