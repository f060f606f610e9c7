"""Expert checkpoints: a folder with ``experts.safetensors`` and ``manifest.json``; its manifest,
tensor digest and writer.

A checkpoint holds only the selected experts under their canonical keys
(``model.layers.{L}.mlp.experts.{E}.{proj}.weight``) plus a manifest that binds them to a domain,
a model revision, a selection digest, a cycle, the global revision the miner started from, and the
sha256 of the tensors (``tensors_digest``). ``write_checkpoint`` writes such a folder atomically.
Reading one back, untrusted, is the strict loader's job (``connito.protocol.strict_loader``); the
manifest parser here is held to the same rules (``bad_manifest``).

A submission's manifest may say ``encoding: int8`` (``connito.protocol.payload``): the file then holds an
int8 delta against the global the miner started from (schema version 2); the digest covers the
bytes uploaded.

May import: connito.errors, connito.fsutil, connito.ml.moe, connito.ml.selection_record,
connito.protocol.payload, connito.protocol.safetensors_header.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal, NamedTuple

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from torch import nn

from connito.errors import ConfigError, InvalidSubmission
from connito.fsutil import atomic_write, fsync_dir
from connito.ml.moe import PROJECTIONS, expert_key, expert_shapes, moe_layers, parse_expert_key
from connito.ml.moe_families import Family, family_of
from connito.ml.selection_record import ExpertSelection
from connito.protocol.payload import Encoding, encode_int8_delta
from connito.protocol.safetensors_header import ST_NAMES, no_duplicates, shown

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERTS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "Manifest",
    "ExpertSpec",
    "tensors_digest",
    "selected_keys",
    "selection_family",
    "expected_expert_specs",
    "write_checkpoint",
]

EXPERTS_FILE = "experts.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION: Final = 1  # 2: the manifest names a payload encoding other than fp
_DIGEST_DOMAIN = b"connito-tensors-v1\n"

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
            json.loads(raw, object_pairs_hook=no_duplicates)
        except (ValueError, RecursionError) as exc:
            detail = "duplicate key" if "duplicate key" in str(exc) else f"not JSON ({type(exc).__name__})"
            raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: <root>: {detail}") from None
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            # an unknown key is miner text: shown escaped, so the message stays on one line
            field = shown(".".join(str(part) for part in err["loc"]) or "<root>")
            raise InvalidSubmission("bad_manifest", f"{MANIFEST_FILE}: {field}: {err['msg']}") from None


class ExpertSpec(NamedTuple):
    """What one expert tensor must look like: ``(shape, dtype)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype


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
        if tensor.dtype not in ST_NAMES:
            raise ValueError(f"{key}: dtype {tensor.dtype} has no safetensors name")
        dtype_name = ST_NAMES[tensor.dtype].encode()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        hasher.update(_length_prefixed(key.encode("utf-8")))
        hasher.update(_length_prefixed(dtype_name))
        hasher.update(struct.pack(f"<{1 + tensor.dim()}Q", tensor.dim(), *tensor.shape))
        hasher.update(struct.pack("<Q", raw.nbytes))
        hasher.update(raw.data)
    return hasher.hexdigest()


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def selection_family(selection: ExpertSelection) -> Family | None:
    """The MoE family whose saved key names a selection's payload uses (None: the qwen form)."""
    return None if selection.model_type is None else family_of(selection.model_type)


def selected_keys(selection: ExpertSelection) -> list[str]:
    """Every expert key a checkpoint for ``selection`` must contain, sorted (the family's saved names)."""
    family = selection_family(selection)
    return sorted(
        expert_key(entry.layer, expert, projection, family=family)
        for entry in selection.layers
        for expert in entry.experts
        for projection in PROJECTIONS
    )


def expected_expert_specs(model: nn.Module, selection: ExpertSelection) -> dict[str, ExpertSpec]:
    """The shape and dtype of every selected expert tensor, read from the base model.

    Raises:
        ConfigError: the selection is for another model_type, names a layer that is not an MoE
            layer of ``model`` or an expert id beyond the layer's expert count.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if selection.model_type is not None and selection.model_type != model_type:
        raise ConfigError(
            f"selection is for model_type {selection.model_type}, the model is {model_type}",
            field="model_type",
        )
    by_index = {layer.index: layer for layer in moe_layers(model)}
    family = selection_family(selection)
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
                key = expert_key(entry.layer, expert, projection, family=family)
                specs[key] = ExpertSpec(shape, dtypes[projection])
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
