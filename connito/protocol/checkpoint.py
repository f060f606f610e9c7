"""Expert checkpoints: a folder with ``experts.safetensors`` and ``manifest.json``, and its strict loader.

A checkpoint holds only the selected experts under their canonical keys
(``model.layers.{L}.mlp.experts.{E}.{proj}.weight``) plus a manifest that binds them to a domain,
a model revision, a selection digest, a cycle, the global revision the miner started from, and the
sha256 of the tensors. Checkpoints from miners (and globals from the lead validator) are untrusted:
``load_checkpoint`` treats them as data, never code. It never unpickles, stats every file before
reading it, validates the safetensors header (keys, dtypes, shapes, offsets) before touching tensor
bytes, and rejects the first violation with ``InvalidSubmission`` and a stable ``reason`` code:

``missing_file`` ``extra_file`` ``too_large`` ``bad_manifest`` ``wrong_selection``
``not_safetensors`` ``extra_key`` ``missing_key`` ``shape`` ``dtype`` ``digest_mismatch``
``non_finite`` ``out_of_range`` ``no_base`` ``stale``

A submission's manifest may say ``encoding: int8`` (``connito.protocol.payload``): the file then holds an
int8 delta against the global the miner started from (schema version 2). Its q and scale tensors
are held to the same rules (keys, shapes, dtypes, digest, finiteness) and to the encoder's bounds
before the loader decodes them against that global; the digest covers the bytes uploaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, NamedTuple

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from torch import nn

from connito.errors import ConfigError, InvalidSubmission, UnsupportedModelError
from connito.fsutil import atomic_write, fsync_dir
from connito.ml.moe import PROJECTIONS, expert_key, expert_shapes, moe_layers, parse_expert_key
from connito.ml.selection_record import ExpertSelection, load_selection
from connito.protocol.payload import (
    Encoding,
    check_int8_payload,
    decode_int8_delta,
    encode_int8_delta,
    int8_specs,
    scale_key,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERTS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "Manifest",
    "ExpertSpec",
    "TensorInfo",
    "tensors_digest",
    "selected_keys",
    "expected_expert_specs",
    "write_checkpoint",
    "read_safetensors_header",
    "load_checkpoint",
    "verify_checkpoint_cli",
]

EXPERTS_FILE = "experts.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION: Final = 1  # 2: the manifest names a payload encoding other than fp
DEFAULT_MAX_MANIFEST_BYTES = 64 * 1024
# The safetensors header is a u64 length then that many bytes of JSON. A hostile length (2**63)
# must not become an allocation: cap it here and by the file size, whichever is smaller.
MAX_HEADER_BYTES = 16 * 2**20
_HEADER_LEN_BYTES = 8
# hf_hub_download(local_dir=...) keeps its own bookkeeping in ``.cache/``; it is not miner content.
_IGNORED_ENTRIES = frozenset({".cache"})
_DIGEST_DOMAIN = b"connito-tensors-v1\n"

# safetensors dtype names <-> torch dtypes (the file format's own vocabulary).
_ST_DTYPES: dict[str, torch.dtype] = {
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
_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}
# Without a model to compare against, expert weights must at least be one of these.
_EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_Text = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
_ShortText = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
_Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Manifest(BaseModel):
    """What a checkpoint claims to be; parsed from untrusted bytes, so strict and bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1, 2] = MANIFEST_SCHEMA_VERSION
    kind: Literal["submission", "global"]
    domain: _ShortText
    model_id: _Text
    model_revision: _ShortText
    selection_digest: _Hex64
    cycle: int = Field(ge=0, le=2**63 - 1)
    global_revision: _ShortText = Field(description="revision/id of the global state training started from")
    hotkey: _ShortText = Field(description="ss58 of the miner (submission) or the lead validator (global)")
    tensors_sha256: _Hex64 = Field(description="tensors_digest of experts.safetensors")
    created_block: int | None = Field(None, ge=0, le=2**63 - 1)
    encoding: Encoding = Field("fp", description="fp: the experts; int8: a delta against global_revision")

    @model_validator(mode="after")
    def _versioned_encoding(self) -> Manifest:
        # v1 readers know no encoding: an fp manifest stays v1 bytes, anything else is v2
        if (self.schema_version == 2) != (self.encoding != "fp"):
            raise ValueError(f"schema_version {self.schema_version} with encoding {self.encoding!r}")
        if self.encoding != "fp" and self.kind != "submission":
            raise ValueError(f"a {self.kind} checkpoint is never {self.encoding}")
        return self

    def to_json(self) -> bytes:
        """Canonical bytes written to ``manifest.json`` (an fp manifest has no ``encoding`` key)."""
        exclude = {"encoding"} if self.encoding == "fp" else None
        return (self.model_dump_json(indent=2, exclude=exclude) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse manifest bytes.

        Raises:
            InvalidSubmission: ``bad_manifest`` for anything that is not a valid manifest.
        """
        try:
            # Duplicate keys first: pydantic keeps the last one, another tool may keep the first,
            # and the reveal binds these bytes (the safetensors header is held to the same rule).
            json.loads(raw, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as exc:
            detail = "duplicate key" if "duplicate key" in str(exc) else f"not JSON ({type(exc).__name__})"
            raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: <root>: {detail}") from None
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            # an unknown key is miner text: shown escaped, so the message stays on one line
            field = _shown(".".join(str(part) for part in err["loc"]) or "<root>")
            raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: {field}: {err['msg']}") from None


class ExpertSpec(NamedTuple):
    """What one expert tensor must look like: ``(shape, dtype)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One entry of a validated safetensors header."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors themselves, independent of how any file serialised them.

    Canonical bytes: a domain tag, then for each key in sorted order the length-prefixed UTF-8 key,
    the length-prefixed safetensors dtype name (``BF16``, ``F32``...), the rank and each dimension,
    and the length-prefixed raw little-endian bytes of the contiguous tensor (all lengths u64 LE).
    Bit-exact: equal digests mean equal bits, including bf16 and the sign of zero.
    """
    assert sys.byteorder == "little", "tensors_digest hashes native bytes as little-endian"
    hasher = hashlib.sha256(_DIGEST_DOMAIN)
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        if tensor.dtype not in _ST_NAMES:
            raise ValueError(f"{key}: dtype {tensor.dtype} has no safetensors name")
        dtype_name = _ST_NAMES[tensor.dtype].encode()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        hasher.update(_length_prefixed(key.encode("utf-8")))
        hasher.update(_length_prefixed(dtype_name))
        hasher.update(struct.pack(f"<{1 + tensor.dim()}Q", tensor.dim(), *tensor.shape))
        hasher.update(struct.pack("<Q", raw.nbytes))
        hasher.update(raw.data)
    return hasher.hexdigest()


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def selected_keys(selection: ExpertSelection) -> list[str]:
    """Every canonical key a checkpoint for ``selection`` must contain, sorted."""
    return sorted(
        expert_key(entry.layer, expert, projection)
        for entry in selection.layers
        for expert in entry.experts
        for projection in PROJECTIONS
    )


def expected_expert_specs(model: nn.Module, selection: ExpertSelection) -> dict[str, ExpertSpec]:
    """The shape and dtype of every selected expert tensor, read from the base model.

    Raises:
        ConfigError: the selection names a layer that is not an MoE layer of ``model`` or an
            expert id beyond the layer's expert count.
    """
    by_index = {layer.index: layer for layer in moe_layers(model)}
    specs: dict[str, ExpertSpec] = {}
    for entry in selection.layers:
        layer = by_index.get(entry.layer)
        if layer is None:
            raise ConfigError(f"layer {entry.layer} is not an MoE layer of the model", field="layers")
        if entry.experts[-1] >= layer.num_experts:
            raise ConfigError(
                f"layer {entry.layer}: expert {entry.experts[-1]} >= num_experts {layer.num_experts}",
                field="layers",
            )
        dtypes = {"gate_proj": layer.gate_up_proj.dtype, "up_proj": layer.gate_up_proj.dtype}
        dtypes["down_proj"] = layer.down_proj.dtype
        for expert in entry.experts:
            for projection, shape in expert_shapes(layer).items():
                specs[expert_key(entry.layer, expert, projection)] = ExpertSpec(shape, dtypes[projection])
    return dict(sorted(specs.items()))


def write_checkpoint(
    folder: str | Path,
    state: Mapping[str, torch.Tensor],
    *,
    kind: Literal["submission", "global"],
    domain: str,
    model_id: str,
    model_revision: str,
    selection_digest: str,
    cycle: int,
    global_revision: str,
    hotkey: str,
    created_block: int | None = None,
    encoding: Encoding = "fp",
    base: Mapping[str, torch.Tensor] | None = None,
) -> Manifest:
    """Write ``state`` and its manifest as a checkpoint folder, replacing ``folder`` if it exists.

    Both files are written into a fresh staging folder next to ``folder`` (each fsynced), which is
    then renamed into place: a reader never sees tensors without their manifest, and the folder
    holds nothing but the two files (the loader rejects anything else). ``encoding="int8"``
    stores ``state - base`` as an int8 delta (``base``: the global of ``global_revision``).

    Raises:
        ValueError: a key is not a canonical expert key, a manifest field is out of bounds, or
            ``int8`` without a ``base`` of the same keys and shapes.
    """
    for key in state:
        parse_expert_key(key)
    if encoding == "int8":
        if base is None:
            raise ValueError("encoding int8 needs the base experts the delta is taken against")
        state = encode_int8_delta(state, base)
    manifest = Manifest(
        schema_version=1 if encoding == "fp" else 2,
        encoding=encoding,
        kind=kind,
        domain=domain,
        model_id=model_id,
        model_revision=model_revision,
        selection_digest=selection_digest,
        cycle=cycle,
        global_revision=global_revision,
        hotkey=hotkey,
        tensors_sha256=tensors_digest(state),
        created_block=created_block,
    )
    cpu_state = {key: state[key].detach().to("cpu").contiguous() for key in sorted(state)}
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        atomic_write(staging / EXPERTS_FILE, safetensors.torch.save(cpu_state, metadata={"format": "pt"}))
        atomic_write(staging / MANIFEST_FILE, manifest.to_json())
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "checkpoint written path=%s kind=%s cycle=%s keys=%d encoding=%s sha256=%s",
        target,
        kind,
        cycle,
        len(cpu_state),
        encoding,
        manifest.tensors_sha256[:12],
    )
    return manifest


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    else:
        os.rename(staging, target)
    fsync_dir(target.parent)


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
    size = _regular_file_size(path)
    if size > max_bytes:
        raise InvalidSubmission("too_large", f"{path.name}: {size} bytes, cap {max_bytes}")
    if size < _HEADER_LEN_BYTES:
        raise _not_safetensors(path, f"{size} bytes is shorter than the header length field")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(_HEADER_LEN_BYTES))
        if header_len > min(MAX_HEADER_BYTES, size - _HEADER_LEN_BYTES):
            raise _not_safetensors(path, f"header length {header_len} exceeds the file or {MAX_HEADER_BYTES}")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _not_safetensors(path, f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    _check_metadata(path, header.pop("__metadata__", {}))
    entries = {key: _parse_entry(path, key, value) for key, value in header.items()}
    _check_offsets(path, entries, data_len=size - _HEADER_LEN_BYTES - header_len)
    return entries


def _regular_file_size(path: Path) -> int:
    try:
        info = os.stat(path)  # follows symlinks (Hub cache snapshots are links into blobs/)
    except OSError:
        raise InvalidSubmission("missing_file", f"{path.name}: not found in {path.parent}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidSubmission("missing_file", f"{path.name}: not a regular file in {path.parent}")
    return info.st_size


def _shown(text: str, limit: int = 160) -> str:
    """An untrusted name fit for a one-line message: printable ASCII as is, else escaped; bounded."""
    shown = text if text.isascii() and text.isprintable() else ascii(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _not_safetensors(path: Path, detail: str) -> InvalidSubmission:
    return InvalidSubmission("not_safetensors", f"{path.name}: {detail}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in header")  # two parsers could disagree on which one wins
    return result


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _not_safetensors(path, "__metadata__ must map strings to strings")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, key: str, value: object) -> TensorInfo:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _not_safetensors(path, f"{_shown(key)}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise _not_safetensors(path, f"{_shown(key)}: unknown dtype {_shown(str(dtype))}")
    if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
        raise _not_safetensors(path, f"{_shown(key)}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise _not_safetensors(path, f"{_shown(key)}: data_offsets must be two non-negative integers")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_offsets(path: Path, entries: dict[str, TensorInfo], *, data_len: int) -> None:
    cursor = 0
    for key, info in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        numel = 1
        for dim in info.shape:
            numel *= dim
        nbytes = numel * _ST_DTYPES[info.dtype].itemsize
        if info.begin != cursor or info.end - info.begin != nbytes:
            raise _not_safetensors(
                path,
                f"{_shown(key)}: data_offsets [{info.begin}, {info.end}] do not tile the data ({nbytes} bytes)",
            )
        cursor = info.end
    if cursor != data_len:
        raise _not_safetensors(path, f"tensors cover {cursor} of {data_len} data bytes")


def load_checkpoint(
    folder: str | Path,
    *,
    selection: ExpertSelection,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None,
    max_bytes: int,
    max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    hotkey: str | None = None,
    cycle: int | None = None,
    revision: str | None = None,
    other_files: tuple[str, ...] = (),
    base: Mapping[str, torch.Tensor] | None = None,
    base_revision: str | None = None,
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Load an untrusted checkpoint, or reject it on its first violation; return its experts.

    ``other_files`` names files the folder may also hold (a published global state carries its
    merge record and outer state); they are not read here.
    ``expected`` maps every key of ``selected_keys(selection)`` to its ``(shape, dtype)``
    (``expected_expert_specs``). ``None`` checks self-consistency only, for tools without the base
    model: per layer, gate/up are ``(I, H)`` and down is ``(H, I)`` with ``(H, I)`` taken from the
    layer's first selected down_proj, and every tensor shares one float dtype. Validators always
    pass ``expected``. ``hotkey``/``cycle``/``revision`` only label error messages; binding the
    manifest to a commitment is the caller's job.

    An ``int8`` payload is decoded against ``base``, the global experts of revision
    ``base_revision`` (its tensors digest, computed when not given), which must be the
    manifest's ``global_revision``; the experts returned are then in ``base``'s dtypes.

    Raises:
        InvalidSubmission: with ``reason`` one of the codes in the module docstring.
        ValueError: ``expected`` does not cover exactly the selected keys (a caller bug).
    """
    try:
        manifest, payload = _load_checkpoint(
            Path(folder), selection, expected, max_bytes, max_manifest_bytes, other_files
        )
        return manifest, _decoded(manifest, payload, base, base_revision)
    except InvalidSubmission as exc:
        raise InvalidSubmission(
            exc.reason, exc.detail, key=exc.key, hotkey=hotkey, cycle=cycle, revision=revision
        ) from None


def _decoded(
    manifest: Manifest,
    payload: dict[str, torch.Tensor],
    base: Mapping[str, torch.Tensor] | None,
    base_revision: str | None,
) -> dict[str, torch.Tensor]:
    """The experts a validated payload stands for (an fp payload is the experts themselves)."""
    if manifest.encoding == "fp":
        return payload
    if base is None:
        raise InvalidSubmission(
            "no_base", f"{manifest.encoding} payload: decoding needs global {manifest.global_revision[:16]}"
        )
    revision = base_revision if base_revision is not None else tensors_digest(base)
    if revision != manifest.global_revision:  # a delta against another global decodes to garbage
        raise InvalidSubmission(
            "stale", f"delta against global {manifest.global_revision[:16]}, this global is {revision[:16]}"
        )
    experts = decode_int8_delta(payload, base)
    for key, tensor in experts.items():
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidSubmission("non_finite", "decodes to NaN or Inf", key=key)
    return experts


def _load_checkpoint(
    folder: Path,
    selection: ExpertSelection,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None,
    max_bytes: int,
    max_manifest_bytes: int,
    other_files: tuple[str, ...] = (),
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    keys = selected_keys(selection)
    if expected is not None and sorted(expected) != keys:
        raise ValueError("expected specs must cover exactly the selected keys")
    _check_folder_entries(folder, other_files)
    experts_path = folder / EXPERTS_FILE
    experts_size = _regular_file_size(experts_path)
    if experts_size > max_bytes:  # before any read: a 10 GB upload costs one stat
        raise InvalidSubmission("too_large", f"{EXPERTS_FILE}: {experts_size} bytes, cap {max_bytes}")
    manifest = _read_manifest(folder / MANIFEST_FILE, max_manifest_bytes)
    _check_selection(manifest, selection)
    header = read_safetensors_header(experts_path, max_bytes=max_bytes)
    int8 = manifest.encoding == "int8"
    expert_keys = keys
    if int8:  # q under each expert key, and its per-row scales beside it
        keys = sorted([*keys, *(scale_key(key) for key in keys)])
    _check_key_set(header, keys)
    specs = _infer_specs(selection, header, int8=int8) if expected is None else expected
    if int8 and expected is not None:
        specs = int8_specs(specs)
    for key in keys:
        _check_spec(key, header[key], specs[key])
    state = _read_tensors(experts_path, header)
    digest = tensors_digest(state)
    if digest != manifest.tensors_sha256:
        raise InvalidSubmission(
            "digest_mismatch",
            f"{EXPERTS_FILE}: sha256 {digest[:16]}.., manifest says {manifest.tensors_sha256[:16]}..",
        )
    for key in keys:
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise InvalidSubmission("non_finite", "contains NaN or Inf", key=key)
    if int8:
        check_int8_payload(state, expert_keys)
    logger.debug("checkpoint loaded path=%s keys=%d sha256=%s", folder, len(state), digest[:12])
    return manifest, state


def _check_folder_entries(folder: Path, other_files: tuple[str, ...] = ()) -> None:
    allowed = _IGNORED_ENTRIES | set(other_files)
    required = {EXPERTS_FILE, MANIFEST_FILE}
    try:
        entries = os.scandir(folder)
    except OSError:
        raise InvalidSubmission("missing_file", f"{folder}: checkpoint folder not found") from None
    seen: set[str] = set()
    extra: list[str] = []
    with entries:
        for entry in entries:
            if entry.name in required:
                seen.add(entry.name)
            elif entry.name not in allowed:
                extra.append(entry.name)
                if len(extra) >= 64:  # enough to report; do not walk a million-file folder
                    break
    if extra:
        raise InvalidSubmission("extra_file", f"{_shown(min(extra))}: unexpected file in {folder}")
    for name in sorted(required - seen):
        raise InvalidSubmission("missing_file", f"{name}: not found in {folder}")


def _read_manifest(path: Path, max_manifest_bytes: int) -> Manifest:
    size = _regular_file_size(path)
    if size > max_manifest_bytes:
        raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: {size} bytes, cap {max_manifest_bytes}")
    with open(path, "rb") as handle:
        raw = handle.read(max_manifest_bytes + 1)
    if len(raw) > max_manifest_bytes:
        raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: grew past {max_manifest_bytes} bytes")
    return Manifest.from_json(raw)


def _check_selection(manifest: Manifest, selection: ExpertSelection) -> None:
    checks = (
        ("selection_digest", manifest.selection_digest, selection.content_digest()),
        ("domain", manifest.domain, selection.domain),
        ("model_id", manifest.model_id, selection.model_id),
        ("model_revision", manifest.model_revision, selection.model_revision),
    )
    for field, got, want in checks:
        if got != want:
            raise InvalidSubmission("wrong_selection", f"{MANIFEST_FILE}: {field} {got!r}, expected {want!r}")


def _check_key_set(header: Mapping[str, TensorInfo], keys: list[str]) -> None:
    wanted = set(keys)
    for key in sorted(header):
        if key not in wanted:  # routers, attention, shared or unselected experts: never accepted
            raise InvalidSubmission("extra_key", "not a selected expert key", key=_shown(key))
    for key in keys:
        if key not in header:
            raise InvalidSubmission("missing_key", "selected expert key absent", key=key)


def _check_spec(key: str, info: TensorInfo, spec: tuple[tuple[int, ...], torch.dtype]) -> None:
    shape, dtype = spec
    if info.shape != tuple(shape):
        raise InvalidSubmission("shape", f"shape {info.shape}, expected {tuple(shape)}", key=key)
    if _ST_DTYPES[info.dtype] != dtype:
        raise InvalidSubmission(
            "dtype", f"dtype {info.dtype}, expected {_ST_NAMES.get(dtype, dtype)}", key=key
        )


def _infer_specs(
    selection: ExpertSelection, header: Mapping[str, TensorInfo], *, int8: bool = False
) -> dict[str, ExpertSpec]:
    """Self-consistent expectations when no base model is at hand (see ``load_checkpoint``)."""
    keys = selected_keys(selection)
    dtype = torch.float32 if int8 else _ST_DTYPES[header[keys[0]].dtype]  # int8: the q layout below
    if dtype not in _EXPERT_DTYPES:
        raise InvalidSubmission(
            "dtype", f"dtype {header[keys[0]].dtype}, expected F32, BF16 or F16", key=keys[0]
        )
    specs: dict[str, ExpertSpec] = {}
    for entry in selection.layers:
        reference = expert_key(entry.layer, entry.experts[0], "down_proj")
        down_shape = header[reference].shape
        if len(down_shape) != 2:
            raise InvalidSubmission("shape", f"shape {down_shape}, expected 2-D (H, I)", key=reference)
        hidden, inter = down_shape
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for expert in entry.experts:
            for projection, shape in shapes.items():
                specs[expert_key(entry.layer, expert, projection)] = ExpertSpec(shape, dtype)
    return {key: ExpertSpec(*spec) for key, spec in int8_specs(specs).items()} if int8 else specs


def _read_tensors(path: Path, header: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Tensor data of a header already validated; re-checked in case the file changed meanwhile."""
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if set(handle.keys()) != set(header):
                raise _not_safetensors(path, "keys changed while reading")
            for key in sorted(header):
                state[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise _not_safetensors(path, f"unreadable ({type(exc).__name__})") from None
    for key, info in header.items():
        tensor = state[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != _ST_DTYPES[info.dtype]:
            raise _not_safetensors(path, f"{key}: changed while reading")
    return state


def verify_checkpoint_cli(
    path: str | Path,
    selection_path: str | Path,
    *,
    max_bytes: int,
    model_dir: str | Path | None = None,
    model: nn.Module | None = None,
    max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
) -> int:
    """``connito verify-checkpoint``: print one line; 0 if a validator would load it, 1 if not.

    Expected shapes and dtype come from ``model`` or, failing that, from the config in
    ``model_dir`` (instantiated on the meta device: no weights are read; dtype is the config's).
    With neither, shapes are checked for self-consistency only (see ``load_checkpoint``).
    An int8 payload is checked in full but not decoded: that needs the global it was trained from.
    Returns 2 when the selection file or the model folder is unusable.
    """
    try:
        selection = load_selection(selection_path)
        if model is None and model_dir is not None:
            model = _model_skeleton(Path(model_dir))
        expected = None if model is None else expected_expert_specs(model, selection)
    except (ConfigError, UnsupportedModelError) as exc:
        print(f"verify-checkpoint: {exc}", file=sys.stderr)
        return 2
    try:
        manifest, _payload = _load_checkpoint(Path(path), selection, expected, max_bytes, max_manifest_bytes)
    except InvalidSubmission as exc:
        print(f"{path}: rejected: {exc}", file=sys.stderr)
        return 1
    print(
        f"{path}: ok kind={manifest.kind} hotkey={manifest.hotkey} cycle={manifest.cycle} "
        f"keys={len(selected_keys(selection))} encoding={manifest.encoding} sha256={manifest.tensors_sha256}"
    )
    return 0


def _model_skeleton(model_dir: Path) -> nn.Module:
    """The base model built from its config on the meta device: shapes and dtypes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build the model from its config: {exc}", path=str(model_dir)) from None
