"""The strict loader: load an untrusted checkpoint folder, or reject it on its first violation.

Checkpoints from miners (and globals from the lead validator) are untrusted: ``load_checkpoint``
treats them as data, never code. It never unpickles, stats every file before reading it, validates
the safetensors header (keys, dtypes, shapes, offsets) before touching tensor bytes, and rejects the
first violation with ``InvalidSubmission`` and a stable ``reason`` code:

``missing_file`` ``extra_file`` ``too_large`` ``bad_manifest`` ``wrong_selection``
``not_safetensors`` ``extra_key`` ``missing_key`` ``shape`` ``dtype`` ``digest_mismatch``
``non_finite`` ``out_of_range`` ``no_base`` ``stale``

An ``int8`` payload's q and scale tensors are held to the same rules (keys, shapes, dtypes, digest,
finiteness) and to the encoder's bounds before the loader decodes them against the global the
miner started from. ``verify_checkpoint_cli`` (``connito verify-checkpoint``) runs the same checks
for an operator.

May import: connito.errors, connito.ml.moe, connito.ml.selection_record, connito.protocol.checkpoint,
connito.protocol.payload, connito.protocol.safetensors_header (and transformers, for the CLI's model
skeleton).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from connito.errors import ConfigError, InvalidSubmission, UnsupportedModelError
from connito.ml.moe import expert_key
from connito.ml.selection_record import ExpertSelection, load_selection
from connito.protocol.checkpoint import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    ExpertSpec,
    Manifest,
    expected_expert_specs,
    selected_keys,
    selection_family,
    tensors_digest,
)
from connito.protocol.payload import check_int8_payload, decode_int8_delta, int8_specs, scale_key
from connito.protocol.safetensors_header import (
    ST_DTYPES,
    ST_NAMES,
    TensorInfo,
    not_safetensors,
    read_safetensors_header,
    regular_file_size,
    shown,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_MANIFEST_BYTES",
    "load_checkpoint",
    "verify_checkpoint_cli",
]

DEFAULT_MAX_MANIFEST_BYTES = 64 * 1024
# hf_hub_download(local_dir=...) keeps its own bookkeeping in ``.cache/``; it is not miner content.
_IGNORED_ENTRIES = frozenset({".cache"})
# Without a model to compare against, expert weights must at least be one of these.
_EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    experts_size = regular_file_size(experts_path)
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
        raise InvalidSubmission("extra_file", f"{shown(min(extra))}: unexpected file in {folder}")
    for name in sorted(required - seen):
        raise InvalidSubmission("missing_file", f"{name}: not found in {folder}")


def _read_manifest(path: Path, max_manifest_bytes: int) -> Manifest:
    size = regular_file_size(path)
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
            raise InvalidSubmission("extra_key", "not a selected expert key", key=shown(key))
    for key in keys:
        if key not in header:
            raise InvalidSubmission("missing_key", "selected expert key absent", key=key)


def _check_spec(key: str, info: TensorInfo, spec: tuple[tuple[int, ...], torch.dtype]) -> None:
    shape, dtype = spec
    if info.shape != tuple(shape):
        raise InvalidSubmission("shape", f"shape {info.shape}, expected {tuple(shape)}", key=key)
    if ST_DTYPES[info.dtype] != dtype:
        raise InvalidSubmission(
            "dtype", f"dtype {info.dtype}, expected {ST_NAMES.get(dtype, dtype)}", key=key
        )


def _infer_specs(
    selection: ExpertSelection, header: Mapping[str, TensorInfo], *, int8: bool = False
) -> dict[str, ExpertSpec]:
    """Self-consistent expectations when no base model is at hand (see ``load_checkpoint``)."""
    keys = selected_keys(selection)
    dtype = torch.float32 if int8 else ST_DTYPES[header[keys[0]].dtype]  # int8: the q layout below
    if dtype not in _EXPERT_DTYPES:
        raise InvalidSubmission(
            "dtype", f"dtype {header[keys[0]].dtype}, expected F32, BF16 or F16", key=keys[0]
        )
    specs: dict[str, ExpertSpec] = {}
    family = selection_family(selection)
    for entry in selection.layers:
        reference = expert_key(entry.layer, entry.experts[0], "down_proj", family=family)
        down_shape = header[reference].shape
        if len(down_shape) != 2:
            raise InvalidSubmission("shape", f"shape {down_shape}, expected 2-D (H, I)", key=reference)
        hidden, inter = down_shape
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for expert in entry.experts:
            for projection, shape in shapes.items():
                specs[expert_key(entry.layer, expert, projection, family=family)] = ExpertSpec(shape, dtype)
    return {key: ExpertSpec(*spec) for key, spec in int8_specs(specs).items()} if int8 else specs


def _read_tensors(path: Path, header: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Tensor data of a header already validated; re-checked in case the file changed meanwhile."""
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if set(handle.keys()) != set(header):
                raise not_safetensors(path, "keys changed while reading")
            for key in sorted(header):
                state[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise not_safetensors(path, f"unreadable ({type(exc).__name__})") from None
    for key, info in header.items():
        tensor = state[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != ST_DTYPES[info.dtype]:
            raise not_safetensors(path, f"{key}: changed while reading")
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
