"""Memory-mapped reader of llama.cpp GGUF files (v2 and v3, little-endian), single or split.

A GGUF file is a header (magic, version, tensor count, KV count), the metadata KVs, one info record per
tensor (name, dims, ggml type, offset into the data section), padding to ``general.alignment`` and the
data section. The whole structure is validated while it is parsed, before anything sized by a count in
the file is allocated: every count is first bounded by the bytes left in the file (an element takes at
least one byte), so a corrupt count of 2**63 fails at once instead of reserving memory. Tensor data is
never read here: ``tensor_bytes`` returns a zero-copy view of the mapping.

Split files (``NAME-00001-of-00003.gguf``, as written by llama.cpp's gguf-split) are opened from their
first part; the parts' ``split.*`` keys are checked against each other and their tensor tables merged.
Metadata comes from the first part, which is where gguf-split puts it.

Every problem is a ``GGUFError`` (a ``ValueError``) whose one-line message names the file, the key or
tensor, and the byte offset where that helps.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from glmtg.formats.ggml_types import GGML_TYPES
from glmtg.loading.gguf_types import ARRAY, BOOL, STRING, UINT32, VALUE_TYPES

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) holds the name plus its terminating NUL
MAX_ARRAY_NESTING = 4  # the spec allows arrays of arrays; no real file nests deeper than 2
INT64_MAX = 2**63 - 1
HEADER_BYTES = 4 + 4 + 8 + 8
# Smallest encodings, used to bound counts by the file size before looping over them.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
MIN_ARRAY_BYTES = 4 + 8  # an empty nested array: element type and count

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS = "split.count", "split.no", "split.tensors.count"


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message names the file and the key or tensor at fault."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives. ``ne`` is llama.cpp's order (``ne[0]`` is contiguous), ``shape`` torch's."""

    name: str
    ne: tuple[int, ...]
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the data in its file
    nbytes: int
    part: int  # index into GGUFFile.paths


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the file and the offset."""

    def __init__(self, buf: Any, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.path = path
        self.pos = 0

    def fail(self, what: str, problem: str, at: int | None = None) -> NoReturn:
        where = "" if at is None else f" (offset {at})"
        raise GGUFError(f"{self.path}: {what}: {problem}{where}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Advance by n bytes and return where they start, or fail if the file ends first."""
        if n > self.left:
            self.fail(what, f"needs {n} bytes but the file ends at {self.size}", self.pos)
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.scalar("<Q", what)
        if n > self.left:
            self.fail(what, f"string length {n} runs past the end of the file ({self.size} bytes)", at)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(what, f"string is not valid UTF-8 ({e.reason} at byte {e.start})", start)


def _read_value(c: _Cursor, vtype: int, what: str, depth: int = 0) -> Any:
    """One metadata value of type ``vtype``: a Python scalar or str; numeric arrays as a 1-D numpy
    array (a copy, so metadata outlives the mapping), string and nested arrays as lists."""
    if vtype not in VALUE_TYPES:
        c.fail(what, f"unknown value type {vtype}", c.pos - 4)
    if vtype == STRING:
        return c.string(what)
    if vtype != ARRAY:
        value = c.scalar(VALUE_TYPES[vtype][1], what)
        return bool(value) if vtype == BOOL else value
    at = c.pos
    etype = c.scalar("<I", what)
    n = c.scalar("<Q", what)
    if etype not in VALUE_TYPES:
        c.fail(what, f"unknown array element type {etype}", at)
    if etype == STRING:
        if n > c.left // 8:
            c.fail(what, f"array of {n} strings cannot fit in the {c.left} bytes left", at)
        return [c.string(f"{what}[{i}]") for i in range(n)]
    if etype == ARRAY:
        if depth + 1 >= MAX_ARRAY_NESTING:
            c.fail(what, f"arrays nested deeper than {MAX_ARRAY_NESTING}", at)
        if n > c.left // MIN_ARRAY_BYTES:
            c.fail(what, f"array of {n} arrays cannot fit in the {c.left} bytes left", at)
        return [_read_value(c, ARRAY, f"{what}[{i}]", depth + 1) for i in range(n)]
    fmt = VALUE_TYPES[etype][1]
    esize = struct.calcsize(fmt)
    if n > c.left // esize:
        c.fail(what, f"array of {n} x {esize}-byte values cannot fit in the {c.left} bytes left", at)
    start = c.take(n * esize, what)
    values = np.frombuffer(c.buf, dtype=np.dtype(fmt), count=n, offset=start).copy()
    return values.astype(bool) if etype == BOOL else values


def _read_kvs(c: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"key of KV #{i}")
        if not key:
            c.fail(f"key of KV #{i}", "empty key", at)
        if key in metadata:
            c.fail(f"key {key!r}", "duplicate key", at)
        vtype = c.scalar("<I", f"type of key {key!r}")
        etype = None
        if vtype == ARRAY and c.left >= 4:
            etype = struct.unpack_from("<I", c.buf, c.pos)[0]
        metadata[key] = _read_value(c, vtype, f"key {key!r}")
        types[key] = (vtype, etype)
    return metadata, types


def _alignment(c: _Cursor, metadata: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return DEFAULT_ALIGNMENT
    if types[key][0] != UINT32:
        c.fail(f"key {key!r}", f"must be UINT32, not {VALUE_TYPES[types[key][0]][0]}")
    value = metadata[key]
    if value < 1 or value & (value - 1):
        c.fail(f"key {key!r}", f"{value} is not a power of two")
    return value


def _read_tensor_info(c: _Cursor, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], int, int, int]:
    """name, ne, ggml type, offset relative to the data section, nbytes; validated except placement."""
    at = c.pos
    name = c.string(f"name of tensor #{i}")
    if not name:
        c.fail(f"name of tensor #{i}", "empty name", at)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        c.fail(f"tensor {name!r}", f"name longer than {MAX_NAME_BYTES} bytes", at)
    if name in seen:
        c.fail(f"tensor {name!r}", "duplicate tensor name", at)
    what = f"tensor {name!r}"
    at = c.pos
    n_dims = c.scalar("<I", what)
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(what, f"n_dims {n_dims} is not in 1..{MAX_DIMS}", at)
    at = c.pos
    ne = tuple(c.scalar("<q", what) for _ in range(n_dims))
    n_elements = 1
    for d in ne:
        if d < 0:
            c.fail(what, f"negative dimension in {list(ne)}", at)
        n_elements *= d
        if n_elements > INT64_MAX:
            c.fail(what, f"element count of {list(ne)} overflows int64", at)
    at = c.pos
    ggml_type = c.scalar("<I", what)
    if ggml_type not in GGML_TYPES:
        c.fail(what, f"unknown ggml type {ggml_type}", at)
    t = GGML_TYPES[ggml_type]
    if ne[0] % t.block_size:
        c.fail(what, f"ne[0]={ne[0]} is not a multiple of {t.name}'s block size {t.block_size}", at)
    offset = c.scalar("<Q", what)
    return name, ne, ggml_type, offset, n_elements // t.block_size * t.type_size


@dataclass
class _Part:
    path: str
    version: int
    metadata: dict[str, Any]
    kv_types: dict[str, tuple[int, int | None]]
    alignment: int
    data_offset: int
    tensors: dict[str, GGUFTensorInfo]


def _parse(buf: Any, path: str, part: int) -> _Part:
    """Validate one file's structure and return its tables; touches no tensor data."""
    c = _Cursor(buf, path)
    if c.size < HEADER_BYTES:
        c.fail("header", f"file of {c.size} bytes is shorter than a GGUF header ({HEADER_BYTES} bytes)")
    magic = bytes(buf[:4])
    if magic != MAGIC:
        c.fail("header", f"bad magic {magic!r} (expected {MAGIC!r})", 0)
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            c.fail("version", "big-endian GGUF files are not supported", 4)
        c.fail("version", f"unsupported GGUF version {version} (supported: 2, 3)", 4)
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "KV count")
    if n_kv > c.left // MIN_KV_BYTES:
        c.fail("KV count", f"{n_kv} KVs cannot fit in a file of {c.size} bytes", 16)
    if n_tensors > (c.left - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:
        c.fail("tensor count", f"{n_tensors} tensors cannot fit in a file of {c.size} bytes", 8)
    metadata, kv_types = _read_kvs(c, n_kv)
    alignment = _alignment(c, metadata, kv_types)
    raw: list[tuple[str, tuple[int, ...], int, int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        raw.append(_read_tensor_info(c, i, seen))
        seen.add(raw[-1][0])
    data_offset = -(-c.pos // alignment) * alignment
    if raw and data_offset > c.size:
        c.fail("data section", f"starts at {data_offset}, past the end of the file ({c.size} bytes)")
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, ggml_type, offset, nbytes in raw:
        what = f"tensor {name!r}"
        if offset % alignment:
            c.fail(what, f"data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_offset + offset
        if start + nbytes > c.size:
            c.fail(what, f"data [{start}, {start + nbytes}) lies outside the file ({c.size} bytes)")
        t = GGML_TYPES[ggml_type]
        tensors[name] = GGUFTensorInfo(name, ne, ne[::-1], ggml_type, t.name, start, nbytes, part)
    _check_overlaps(c, tensors.values())
    return _Part(path, version, metadata, kv_types, alignment, data_offset, tensors)


def _check_overlaps(c: _Cursor, infos: Any) -> None:
    placed = sorted((t for t in infos if t.nbytes), key=lambda t: t.offset)
    for prev, cur in itertools.pairwise(placed):
        if cur.offset < prev.offset + prev.nbytes:
            c.fail(f"tensor {cur.name!r}", f"data at {cur.offset} overlaps tensor {prev.name!r} "
                   f"[{prev.offset}, {prev.offset + prev.nbytes})")


def _map(path: str) -> mmap.mmap | bytes:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""  # mmap refuses empty files; _parse reports the missing header
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None


def _release(buf: mmap.mmap | bytes) -> None:
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:
            pass  # views from tensor_bytes are still alive; the mapping goes when the last one does


class GGUFFile:
    """An open GGUF file or split set: ``metadata``, ``kv_types``, ``tensors`` and ``tensor_bytes``.

    ``metadata`` maps each key to a Python value (numeric arrays as numpy arrays, string and nested arrays
    as lists); ``kv_types`` maps it to (GGUF value type id, element type id or None). ``tensors`` maps each
    name to its ``GGUFTensorInfo``; the mappings stay open until ``close()`` (or the end of a ``with``).
    """

    def __init__(self, parts: list[_Part], bufs: list[mmap.mmap | bytes]) -> None:
        self.paths = [p.path for p in parts]
        self.version = parts[0].version
        self.alignment = parts[0].alignment
        self.metadata = parts[0].metadata
        self.kv_types = parts[0].kv_types
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for p in parts:
            self.tensors.update(p.tensors)
        self._bufs: list[mmap.mmap | bytes] | None = bufs

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view of the mapping (no copy)."""
        if self._bufs is None:
            raise GGUFError(f"{self.paths[0]}: file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.paths[0]}: no tensor named {name!r}")
        return np.frombuffer(self._bufs[info.part], dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def close(self) -> None:
        for buf in self._bufs or []:
            _release(buf)
        self._bufs = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.paths[0]!r}, parts={len(self.paths)}, tensors={len(self.tensors)})"


def _open_part(path: str, part: int, bufs: list[mmap.mmap | bytes]) -> _Part:
    buf = _map(path)
    bufs.append(buf)
    return _parse(buf, path, part)


def _split_key(first: _Part, key: str, lo: int, hi: int) -> int:
    value = first.metadata.get(key)
    if value is None or isinstance(value, (bool, float, str, list, np.ndarray)) or not lo <= value <= hi:
        raise GGUFError(f"{first.path}: key {key!r}: must be an integer in {lo}..{hi} in a split file, "
                        f"got {value!r}")
    return int(value)


def _split_paths(first: _Part) -> list[str]:
    """Paths of every part of the set that ``first`` belongs to (just itself when it is not split)."""
    match = SPLIT_NAME.match(os.path.basename(first.path))
    if SPLIT_COUNT not in first.metadata:
        if match and int(match["count"]) > 1:
            raise GGUFError(f"{first.path}: named as part of a split set but has no {SPLIT_COUNT!r} key")
        return [first.path]
    count = _split_key(first, SPLIT_COUNT, 1, 99999)
    no = _split_key(first, SPLIT_NO, 0, count - 1) if SPLIT_NO in first.metadata or count > 1 else 0
    if no != 0:
        raise GGUFError(f"{first.path}: key {SPLIT_NO!r}: this is part {no + 1} of {count}; open part 1")
    if count == 1:
        return [first.path]
    if not match or int(match["count"]) != count or int(match["no"]) != 1:
        raise GGUFError(f"{first.path}: key {SPLIT_COUNT!r}: {count} parts, but the name is not "
                        f"NAME-00001-of-{count:05d}.gguf")
    folder = os.path.dirname(first.path)
    return [os.path.join(folder, f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _check_split(parts: list[_Part]) -> None:
    first, count = parts[0], len(parts)
    total = _split_key(first, SPLIT_TENSORS, 0, 2**31 - 1) if count > 1 or SPLIT_TENSORS in first.metadata else None
    owner: dict[str, str] = {}
    for i, p in enumerate(parts):
        if i:
            if _split_key(p, SPLIT_COUNT, 1, 99999) != count:
                raise GGUFError(f"{p.path}: key {SPLIT_COUNT!r}: {p.metadata[SPLIT_COUNT]} but part 1 says {count}")
            if _split_key(p, SPLIT_NO, 0, count - 1) != i:
                raise GGUFError(f"{p.path}: key {SPLIT_NO!r}: {p.metadata[SPLIT_NO]} but this is part {i + 1}")
            if SPLIT_TENSORS in p.metadata and p.metadata[SPLIT_TENSORS] != total:
                raise GGUFError(f"{p.path}: key {SPLIT_TENSORS!r}: {p.metadata[SPLIT_TENSORS]} but part 1 says {total}")
        for name in p.tensors:
            if name in owner:
                raise GGUFError(f"{p.path}: tensor {name!r}: also in {owner[name]}")
            owner[name] = p.path
    if total is not None and total != len(owner):
        raise GGUFError(f"{first.path}: key {SPLIT_TENSORS!r}: {total} but the {count} parts hold {len(owner)} tensors")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; for ``NAME-00001-of-0000N.gguf`` open and merge all N parts."""
    path = os.fspath(path)
    bufs: list[mmap.mmap | bytes] = []
    try:
        parts = [_open_part(path, 0, bufs)]
        for i, part_path in enumerate(_split_paths(parts[0])[1:], start=1):
            parts.append(_open_part(part_path, i, bufs))
        _check_split(parts)
    except BaseException:
        for buf in bufs:
            _release(buf)
        raise
    return GGUFFile(parts, bufs)
