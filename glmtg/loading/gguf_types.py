"""GGUF's metadata value types (the tensor types are ``glmtg.formats.ggml_types``)."""

from __future__ import annotations

# Metadata value types (GGUFValueType): id -> (name, struct format of a scalar; None = variable size).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    UINT8: ("UINT8", "<B"),
    INT8: ("INT8", "<b"),
    UINT16: ("UINT16", "<H"),
    INT16: ("INT16", "<h"),
    UINT32: ("UINT32", "<I"),
    INT32: ("INT32", "<i"),
    FLOAT32: ("FLOAT32", "<f"),
    BOOL: ("BOOL", "<B"),
    STRING: ("STRING", None),
    ARRAY: ("ARRAY", None),
    UINT64: ("UINT64", "<Q"),
    INT64: ("INT64", "<q"),
    FLOAT64: ("FLOAT64", "<d"),
}
