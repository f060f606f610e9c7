"""The global expert state: genesis, fetching a publication from the store, and verifying it.

A global state is the selected experts' tensors (its revision is their digest), the outer
optimizer state, and the merge record that produced it. Genesis is the base model's experts.
Everything fetched from the store is untrusted until the strict loader, the tensor digest and the
record digest bound on chain all agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.config import DomainConfig
from connito.errors import InvalidSubmission
from connito.fsutil import atomic_write
from connito.hub.base import CheckpointStore, StoreRef
from connito.ml.outer import OuterOptimizer, OuterState
from connito.ml.selection_record import ExpertSelection
from connito.protocol.checkpoint import EXPERTS_FILE, MANIFEST_FILE, ExpertSpec, write_checkpoint
from connito.protocol.commitments import GlobalPayload, short_digest
from connito.protocol.merge import (
    MERGE_RECORD_FILE,
    OUTER_STATE_FILE,
    MergeRecord,
    initial_outer_state,
    record_digest,
    state_revision,
)
from connito.protocol.strict_loader import load_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "GLOBAL_FILES",
    "GlobalState",
    "genesis_global",
    "expected_specs",
    "fetch_global",
    "save_global",
    "load_global",
]

GLOBAL_FILES: tuple[str, ...] = (EXPERTS_FILE, MANIFEST_FILE, MERGE_RECORD_FILE, OUTER_STATE_FILE)
MAX_RECORD_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalState:
    """One version of the global experts and the optimizer state that produced it."""

    cycle: int  # the cycle whose merge produced it; -1 for genesis
    revision: str  # tensors digest of ``experts``
    experts: dict[str, torch.Tensor]  # canonical expert key -> tensor (model dtype)
    outer: OuterState
    record: MergeRecord | None = None
    ref: StoreRef | None = None


def genesis_global(experts: dict[str, torch.Tensor]) -> GlobalState:
    """The state every node agrees on before any merge: the base model's selected experts."""
    return GlobalState(
        cycle=-1, revision=state_revision(experts), experts=experts, outer=initial_outer_state(experts)
    )


def expected_specs(state: GlobalState) -> dict[str, ExpertSpec]:
    """The key, shape and dtype that every payload against ``state`` must have."""
    return {key: ExpertSpec(tuple(tensor.shape), tensor.dtype) for key, tensor in state.experts.items()}


def save_outer(outer: OuterState, path: Path) -> None:
    template = {key: outer.master[key].to(outer.dtypes[key]) for key in outer.master}
    optimizer = OuterOptimizer(template)
    optimizer.load_state_dict(outer)
    optimizer.save(path)


def load_outer(path: Path, experts: dict[str, torch.Tensor]) -> OuterState:
    optimizer = OuterOptimizer(experts)
    optimizer.load(path)
    return optimizer.state_dict()


def save_global(
    state: GlobalState, folder: Path, *, config: DomainConfig, selection: ExpertSelection, hotkey: str
) -> None:
    """Write a global state as a folder the store can publish (experts, manifest, record, outer)."""
    write_checkpoint(
        folder,
        state.experts,
        kind="global",
        domain=config.name,
        model_id=selection.model_id,
        model_revision=selection.model_revision,
        selection_digest=selection.digest,
        cycle=max(state.cycle, 0),
        global_revision=state.record.parent_revision if state.record else state.revision,
        hotkey=hotkey,
    )
    if state.record is not None:
        atomic_write(folder / MERGE_RECORD_FILE, (state.record.model_dump_json(indent=2) + "\n").encode())
    save_outer(state.outer, folder / OUTER_STATE_FILE)


def load_global(
    folder: Path,
    *,
    selection: ExpertSelection,
    expected: dict[str, ExpertSpec],
    max_bytes: int,
    cycle: int,
    ref: StoreRef | None = None,
) -> GlobalState:
    """Read and verify a global folder (strict loader; record and outer state must agree).

    Raises:
        InvalidSubmission: any file is malformed or the digests disagree.
    """
    if not (folder / OUTER_STATE_FILE).is_file():
        raise InvalidSubmission("missing_file", f"global state lacks {OUTER_STATE_FILE}")
    manifest, experts = _load_experts(folder, selection, expected, max_bytes)
    record = None
    if (folder / MERGE_RECORD_FILE).exists():
        raw = (folder / MERGE_RECORD_FILE).read_bytes()
        if len(raw) > MAX_RECORD_BYTES:
            raise InvalidSubmission("bad_record", f"{MERGE_RECORD_FILE} is {len(raw)} bytes")
        try:
            record = MergeRecord.model_validate_json(raw)
        except ValueError as exc:
            raise InvalidSubmission(
                "bad_record", f"{MERGE_RECORD_FILE}: {str(exc).splitlines()[0]}"
            ) from None
        if record.result_revision != manifest.tensors_sha256:
            raise InvalidSubmission("bad_record", "record result_revision differs from the experts' digest")
    try:
        outer = load_outer(folder / OUTER_STATE_FILE, experts)
    except Exception as exc:  # StateError and safetensors errors: the file is untrusted input
        raise InvalidSubmission("bad_outer_state", f"{OUTER_STATE_FILE}: {exc}") from None
    return GlobalState(
        cycle=cycle, revision=manifest.tensors_sha256, experts=experts, outer=outer, record=record, ref=ref
    )


def _load_experts(folder: Path, selection: ExpertSelection, expected, max_bytes: int):
    manifest, experts = load_checkpoint(
        folder,
        selection=selection,
        expected=expected,
        max_bytes=max_bytes,
        other_files=(MERGE_RECORD_FILE, OUTER_STATE_FILE),
    )
    if manifest.kind != "global":
        raise InvalidSubmission("bad_manifest", f"kind {manifest.kind!r}, expected 'global'")
    return manifest, experts


def fetch_global(
    store: CheckpointStore,
    lead_hotkey: str,
    payload: GlobalPayload,
    dest: Path,
    *,
    selection: ExpertSelection,
    expected: dict[str, ExpertSpec],
    max_bytes: int,
) -> GlobalState:
    """Download the lead's publication and verify it against the digest it committed on chain.

    Raises:
        StoreError: the store failed or the files are too large.
        InvalidSubmission: the files are malformed or do not match the commitment.
    """
    ref = StoreRef(kind=payload.store_kind, repo=payload.repo, revision=payload.revision)
    store.download(ref, dest, max_bytes=max_bytes, files=GLOBAL_FILES)
    state = load_global(
        dest, selection=selection, expected=expected, max_bytes=max_bytes, cycle=payload.cycle, ref=ref
    )
    if state.record is None:
        raise InvalidSubmission(
            "bad_record", "published global state has no merge record", hotkey=lead_hotkey
        )
    if short_digest(record_digest(state.record)) != payload.record_digest:
        raise InvalidSubmission("bad_record", "merge record digest differs from the chain commitment")
    if state.record.cycle != payload.cycle or state.record.lead_hotkey != lead_hotkey:
        raise InvalidSubmission("bad_record", "merge record cycle or lead differs from the commitment")
    logger.info(
        "global fetched cycle=%d rev=%s lead=%s", payload.cycle, state.revision[:12], lead_hotkey[:10]
    )
    return state
