"""From chain commitments to verified candidates: the validator's gate for untrusted submissions.

Commitments are observed every block (a hotkey's reveal replaces its commit on chain, so the
commit must be seen while it is there) and persisted. A submission becomes a ``Candidate`` only if
its commit landed inside the commit phase, its reveal inside the reveal phase, the download fits
the byte cap, the strict loader accepts the files, the manifest names this domain, cycle, hotkey,
model and current global revision, and the commit digest recomputed from them matches the chain.
Every failure is a rejection with a reason, never an exception out of the neuron.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import torch
from pydantic import BaseModel, ConfigDict

from connito.chain.base import Commitment
from connito.config import DomainConfig
from connito.errors import CommitmentDecodeError, InvalidSubmission
from connito.hub.base import CheckpointStore, StoreRef
from connito.ml.selection_record import ExpertSelection
from connito.protocol.checkpoint import MANIFEST_FILE, ExpertSpec
from connito.protocol.commitments import (
    CommitPayload,
    RevealPayload,
    commit_digest,
    decode_commitment,
    short_digest,
)
from connito.protocol.phases import phase, phase_bounds
from connito.protocol.scoring import Candidate
from connito.protocol.strict_loader import load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["Observation", "observe_commitments", "precheck", "fetch_and_verify"]


class _Labels(TypedDict):
    """Who and what a rejection is about, attached to every ``InvalidSubmission`` raised here."""

    hotkey: str
    cycle: int
    revision: str


class Observation(BaseModel):
    """What a validator saw on chain for one hotkey in one cycle (persisted)."""

    model_config = ConfigDict(extra="forbid")

    commit_digest: str | None = None  # hex of the first in-window commit
    commit_block: int | None = None
    commit_violation: str | None = None  # early_commit | late_commit | double_commit
    reveal_repo: str | None = None
    reveal_kind: str | None = None
    reveal_revision: str | None = None
    reveal_manifest_digest: str | None = None
    reveal_block: int | None = None
    reveal_violation: str | None = None  # late_reveal


def observe_commitments(
    observed: dict[int, dict[str, Observation]],
    commitments: list[Commitment],
    config: DomainConfig,
    *,
    ignore: set[str],
) -> None:
    """Fold the chain's current commitments into ``observed`` (cycle -> hotkey -> Observation).

    A payload counts only for the cycle of the block that carries it. Anyone registered can write
    any cycle number; the validator keeps only its latest few cycles, so commitments naming far-
    future cycles would otherwise evict the current cycle's observations and void every honest
    submission. A commit or reveal for cycle c written in another cycle is never in time anyway.
    """
    for commitment in commitments:
        if commitment.hotkey in ignore:
            continue
        try:
            payload = decode_commitment(commitment.data)
        except CommitmentDecodeError:
            continue  # foreign or malformed: not a submission
        if payload.cycle != phase(commitment.block, config.cycle).cycle:
            continue  # another cycle's payload (a replay, or a far-future cycle number)
        if isinstance(payload, CommitPayload):
            _observe_commit(observed, commitment, payload, config)
        elif isinstance(payload, RevealPayload):
            _observe_reveal(observed, commitment, payload, config)


def _observe_commit(observed, commitment: Commitment, payload: CommitPayload, config: DomainConfig) -> None:
    first, last = phase_bounds(payload.cycle, "commit", config.cycle)
    entry = observed.setdefault(payload.cycle, {}).setdefault(commitment.hotkey, Observation())
    digest = payload.digest.hex()
    if entry.commit_digest is not None:
        if (digest, commitment.block) != (entry.commit_digest, entry.commit_block):
            entry.commit_violation = "double_commit"
        return
    if entry.commit_violation is not None:
        return
    if commitment.block < first:
        entry.commit_violation = "early_commit"
    elif commitment.block > last:
        entry.commit_violation = "late_commit"
    else:
        entry.commit_digest, entry.commit_block = digest, commitment.block


def _observe_reveal(observed, commitment: Commitment, payload: RevealPayload, config: DomainConfig) -> None:
    first, last = phase_bounds(payload.cycle, "reveal", config.cycle)
    entry = observed.setdefault(payload.cycle, {}).setdefault(commitment.hotkey, Observation())
    if entry.reveal_block is not None or entry.reveal_violation is not None:
        return
    if not first <= commitment.block <= last:
        entry.reveal_violation = "early_reveal" if commitment.block < first else "late_reveal"
        return
    entry.reveal_kind = payload.store_kind
    entry.reveal_repo = payload.repo
    entry.reveal_revision = payload.revision
    entry.reveal_manifest_digest = payload.manifest_digest.hex()
    entry.reveal_block = commitment.block


def precheck(entry: Observation) -> tuple[str, str] | None:
    """A rejection (reason, detail) decided from chain observations alone, or None."""
    if entry.commit_violation is not None:
        return entry.commit_violation, "commitment outside the rules of the commit phase"
    if entry.commit_digest is None:
        return "no_commit", "no commitment inside the commit phase"
    if entry.reveal_violation is not None:
        return entry.reveal_violation, "reveal outside the reveal phase"
    if entry.reveal_block is None:
        return "no_reveal", "committed but never revealed"
    return None


def fetch_and_verify(
    store: CheckpointStore,
    entry: Observation,
    dest: Path,
    *,
    hotkey: str,
    uid: int,
    cycle: int,
    config: DomainConfig,
    selection: ExpertSelection,
    expected: dict[str, ExpertSpec],
    global_revision: str,
    global_experts: Mapping[str, torch.Tensor] | None = None,
) -> Candidate:
    """Download one revealed checkpoint and turn it into a verified candidate.

    ``global_experts`` (of ``global_revision``) decode an int8 payload; without them one is refused.

    Raises:
        InvalidSubmission: any violation (``reason`` says which).
        StoreError: the store failed; ``reason`` is missing | too_large | unreachable | refused.
    """
    ref = StoreRef(
        kind=entry.reveal_kind or "", repo=entry.reveal_repo or "", revision=entry.reveal_revision or ""
    )
    if ref.kind != store.kind:
        raise InvalidSubmission(
            "wrong_store", f"revealed store {ref.kind!r}, this subnet uses {store.kind!r}"
        )
    store.download(ref, dest, max_bytes=config.scoring.max_payload_bytes)
    labels = _Labels(hotkey=hotkey, cycle=cycle, revision=ref.revision[:12])
    manifest_path = dest / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InvalidSubmission("missing_file", f"{MANIFEST_FILE}: not in the download", **labels)
    if manifest_path.stat().st_size > config.scoring.max_manifest_bytes:  # before reading a byte of it
        raise InvalidSubmission(
            "bad_manifest", f"{MANIFEST_FILE}: over {config.scoring.max_manifest_bytes} bytes", **labels
        )
    manifest_sha = hashlib.sha256(manifest_path.read_bytes()).digest()
    if short_digest(manifest_sha).hex() != entry.reveal_manifest_digest:
        raise InvalidSubmission("reveal_mismatch", "manifest differs from the revealed digest", **labels)
    manifest, state = load_checkpoint(
        dest,
        selection=selection,
        expected=expected,
        max_bytes=config.scoring.max_payload_bytes,
        max_manifest_bytes=config.scoring.max_manifest_bytes,
        base=global_experts,
        base_revision=global_revision,
        **labels,
    )
    checks = (
        ("kind", manifest.kind, "submission", "wrong_kind"),
        ("domain", manifest.domain, config.name, "wrong_domain"),
        ("cycle", manifest.cycle, cycle, "wrong_cycle"),
        ("hotkey", manifest.hotkey, hotkey, "wrong_hotkey"),
        ("model_revision", manifest.model_revision, selection.model_revision, "wrong_model"),
        ("global_revision", manifest.global_revision, global_revision, "stale"),
    )
    for field, got, want, reason in checks:
        if got != want:
            raise InvalidSubmission(
                reason, f"manifest {field} {str(got)[:16]!r}, expected {str(want)[:16]!r}", **labels
            )
    digest = commit_digest(
        domain=manifest.domain,
        cycle=manifest.cycle,
        global_revision=manifest.global_revision,
        hotkey=manifest.hotkey,
        tensors_sha256=manifest.tensors_sha256,
    )
    if digest.hex() != entry.commit_digest:
        raise InvalidSubmission("commit_mismatch", "checkpoint does not match the committed digest", **labels)
    return Candidate(
        hotkey=hotkey,
        uid=uid,
        commit_block=entry.commit_block or 0,
        tensors_sha256=manifest.tensors_sha256,
        state=state,
    )
