"""The strict safetensors header parser: read and validate a header without touching tensor bytes.

A safetensors file is a u64 length, that many bytes of JSON (one entry of ``dtype``/``shape``/
``data_offsets`` per tensor, plus an optional ``__metadata__``), then the data. Checkpoint files are
untrusted, so ``read_safetensors_header`` stats the file first, caps the header length, refuses
duplicate keys, unknown dtypes and offsets that do not tile the data exactly, and rejects with
``InvalidSubmission`` (``missing_file``, ``too_large``, ``not_safetensors``). Also here: the format's
dtype vocabulary and small helpers for reading untrusted input (``regular_file_size``, ``shown``,
``no_duplicates``) that the manifest and the strict loader share.

May import: connito.errors (and torch, for the dtype vocabulary).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.errors import InvalidSubmission

__all__ = [
    "MAX_HEADER_BYTES",
    "ST_DTYPES",
    "ST_NAMES",
    "TensorInfo",
    "read_safetensors_header",
    "regular_file_size",
    "shown",
    "not_safetensors",
    "no_duplicates",
]

# The safetensors header is a u64 length then that many bytes of JSON. A hostile length (2**63)
# must not become an allocation: cap it here and by the file size, whichever is smaller.
MAX_HEADER_BYTES = 16 * 2**20
_HEADER_LEN_BYTES = 8

# safetensors dtype names <-> torch dtypes (the file format's own vocabulary).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in ST_DTYPES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One entry of a validated safetensors header."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def read_safetensors_header(path: str | Path, *, max_bytes: int) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading any tensor bytes.

    Checks what the format promises: a sane header length, a UTF-8 JSON object without duplicate
    keys, entries of exactly ``dtype``/``shape``/``data_offsets``, known dtypes, and offsets that
    tile the data section exactly (no gaps, overlaps or trailing bytes for hidden payloads).
    ``__metadata__`` may be present (string to string) but is never trusted.

    Raises:
        InvalidSubmission: ``missing_file``, ``too_large`` (over ``max_bytes``, by stat) or
            ``not_safetensors``.
    """
    path = Path(path)
    size = regular_file_size(path)
    if size > max_bytes:
        raise InvalidSubmission("too_large", f"{path.name}: {size} bytes, cap {max_bytes}")
    if size < _HEADER_LEN_BYTES:
        raise not_safetensors(path, f"{size} bytes is shorter than the header length field")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(_HEADER_LEN_BYTES))
        if header_len > min(MAX_HEADER_BYTES, size - _HEADER_LEN_BYTES):
            raise not_safetensors(path, f"header length {header_len} exceeds the file or {MAX_HEADER_BYTES}")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise not_safetensors(path, f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise not_safetensors(path, "header is not a JSON object")
    _check_metadata(path, header.pop("__metadata__", {}))
    entries = {key: _parse_entry(path, key, value) for key, value in header.items()}
    _check_offsets(path, entries, data_len=size - _HEADER_LEN_BYTES - header_len)
    return entries


def regular_file_size(path: Path) -> int:
    """Size of a regular file by ``stat`` alone (symlinks followed); ``missing_file`` otherwise."""
    try:
        info = os.stat(path)  # follows symlinks (Hub cache snapshots are links into blobs/)
    except OSError:
        raise InvalidSubmission("missing_file", f"{path.name}: not found in {path.parent}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidSubmission("missing_file", f"{path.name}: not a regular file in {path.parent}")
    return info.st_size


def shown(text: str, limit: int = 160) -> str:
    """An untrusted name fit for a one-line message: printable ASCII as is, else escaped; bounded."""
    escaped = text if text.isascii() and text.isprintable() else ascii(text)
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def not_safetensors(path: Path, detail: str) -> InvalidSubmission:
    """The ``not_safetensors`` rejection for ``path``, to raise."""
    return InvalidSubmission("not_safetensors", f"{path.name}: {detail}")


def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A ``json.loads`` ``object_pairs_hook`` that refuses an object with a key twice."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in header")  # two parsers could disagree on which one wins
    return result


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise not_safetensors(path, "__metadata__ must map strings to strings")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, key: str, value: object) -> TensorInfo:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise not_safetensors(path, f"{shown(key)}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise not_safetensors(path, f"{shown(key)}: unknown dtype {shown(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
        raise not_safetensors(path, f"{shown(key)}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise not_safetensors(path, f"{shown(key)}: data_offsets must be two non-negative integers")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_offsets(path: Path, entries: dict[str, TensorInfo], *, data_len: int) -> None:
    cursor = 0
    for key, info in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        numel = 1
        for dim in info.shape:
            numel *= dim
        nbytes = numel * ST_DTYPES[info.dtype].itemsize
        if info.begin != cursor or info.end - info.begin != nbytes:
            raise not_safetensors(
                path,
                f"{shown(key)}: data_offsets [{info.begin}, {info.end}] do not tile the data ({nbytes} bytes)",
            )
        cursor = info.end
    if cursor != data_len:
        raise not_safetensors(path, f"tensors cover {cursor} of {data_len} data bytes")
