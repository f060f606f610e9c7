"""Fill the library: validators record each global version they publish or adopt; anyone can rebuild.

The record's losses are measured on a fixed held-out sample (seed ``LIBRARY_EVAL_SEED``, the
domain's ``scoring.eval_batches`` x ``eval_batch_size``), not the cycle's seeded one, so the
versions of a domain are comparable with each other and a rebuild reproduces them exactly.
Recording is a side record of the protocol: a library failure is logged and never stops a
validator from publishing or adopting.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path

from connito.chain.base import Chain
from connito.chain.local import LocalChain
from connito.config import CycleConfig, DomainConfig, config_digest
from connito.data import DomainData
from connito.errors import ConnitoError, InvalidSubmission, LibraryError, StoreError
from connito.hub.base import CheckpointStore, StoreRef
from connito.library.index import Library
from connito.library.records import Contributor, StoreLocation, VersionDraft, VersionRecord
from connito.ml.modeling import load_model
from connito.ml.moe import read_experts
from connito.ml.selection_record import ExpertSelection
from connito.protocol.checkpoint import ExpertSpec
from connito.protocol.global_state import GlobalState, fetch_global
from connito.protocol.heldout import LossFn, heldout_losses
from connito.protocol.merge import record_digest
from connito.protocol.publication import Publication, publication_of_cycle, publisher_history, publisher_ranks

logger = logging.getLogger(__name__)

__all__ = [
    "LIBRARY_EVAL_SEED",
    "version_draft",
    "record_global",
    "rebuild_library",
]

LIBRARY_EVAL_SEED = 0


def version_draft(
    state: GlobalState,
    *,
    config: DomainConfig,
    selection: ExpertSelection,
    ref: StoreRef | None,
    block: int | None,
    losses: tuple[float, float] | None,
) -> VersionDraft:
    """The library's view of a published global state (it must carry its merge record)."""
    record = state.record
    assert record is not None, "only merged or adopted globals (with a record) become versions"
    return VersionDraft(
        domain=config.name,
        model_id=selection.model_id,
        model_revision=selection.model_revision,
        selection_digest=selection.digest,
        config_digest=config_digest(config),
        cycle=record.cycle,
        tensors_sha256=state.revision,
        store=StoreLocation(kind=ref.kind, repo=ref.repo, revision=ref.revision) if ref is not None else None,
        domain_loss=losses[0] if losses else None,
        general_loss=losses[1] if losses else None,
        eval_seed=LIBRARY_EVAL_SEED if losses else None,
        parent_revision=record.parent_revision,
        decision=record.decision,
        contributors=tuple(
            Contributor(hotkey=i.hotkey, uid=i.uid, weight=i.weight, tensors_sha256=i.tensors_sha256)
            for i in record.inputs
        ),
        merge_record_sha256=record_digest(record),
        lead_hotkey=record.lead_hotkey,
        block=block,
    )


def record_global(
    library: Library,
    state: GlobalState,
    *,
    config: DomainConfig,
    selection: ExpertSelection,
    chain: Chain,
    base_dir: Path,
    ref: StoreRef | None,
    block: int | None,
    losses: LossFn,
) -> VersionRecord | None:
    """Record a published or adopted global state; the validators' one call into the library.

    Skips the evaluation when the version is already recorded with its losses (the lead recorded
    it when publishing, or another validator shares this library). Never raises for a library
    failure: it is logged as an ERROR and the protocol goes on.
    """
    if state.record is None:
        return None
    try:
        existing = library.find_revision(config.name, state.record.cycle, state.revision)
        if (
            existing is not None
            and existing.domain_loss is not None
            and (ref is None or existing.store is not None)
        ):
            return existing
        if block is None:
            block = _commit_block(chain, state, config.cycle)
        measured = losses(state.experts, LIBRARY_EVAL_SEED)
        library.put_domain(config, selection)
        library.put_base(selection.model_id, selection.model_revision, str(Path(base_dir).resolve()))
        draft = version_draft(
            state, config=config, selection=selection, ref=ref, block=block, losses=measured
        )
        record, _ = library.record(draft, state.experts)
        return record
    except (ConnitoError, OSError, sqlite3.Error, RuntimeError) as exc:  # never block the protocol
        logger.error(
            "library record failed cycle=%d rev=%s: %s", state.cycle, state.revision[:12], exc, exc_info=True
        )
        return None


def _commit_block(chain: Chain, state: GlobalState, cycle_config: CycleConfig) -> int | None:
    """The block of the valid publication (lead's or stand-in's) of ``state``'s cycle, if still on chain."""
    if state.record is None:
        return None
    try:
        found = publication_of_cycle(chain, cycle_config, state.record.cycle)
    except ConnitoError:
        return None
    return None if found is None else found.block


def _publications(chain: Chain, cycle_config: CycleConfig) -> list[Publication]:
    """Each cycle's chosen publication: the whole history on a LocalChain, else what is on chain now.

    A subtensor node keeps one commitment per hotkey, so there a rebuild can only add the versions
    committed now; running it once per cycle (or recording in the validators) keeps a library whole.
    """
    if isinstance(chain, LocalChain):
        return publisher_history(chain.commitment_history, chain, cycle_config)
    return publisher_history(
        lambda hotkey: [c for c in chain.commitments() if c.hotkey == hotkey], chain, cycle_config
    )


def rebuild_library(
    library: Library,
    *,
    chain: Chain,
    store: CheckpointStore,
    config: DomainConfig,
    selection: ExpertSelection,
    base_dir: Path,
    data: DomainData,
) -> list[VersionRecord]:
    """Record every global the network adopted (lead's or stand-in's), from the chain and the store.

    Each cycle's chosen publication (``protocol.publication``: inside its publisher's window,
    lowest rank) is fetched and verified as a validator would (strict loader, tensors digest,
    merge record digest bound on chain); a publication that fails is skipped with a WARNING.
    Commitments outside their window are never adopted by validators, so never recorded.

    Raises:
        LibraryError: the chain has no validator with a permit (nobody may publish).
    """
    if not publisher_ranks(chain.metagraph()):
        raise LibraryError("rebuild: the chain has no validator with a permit (no lead)")
    model = load_model(base_dir, config.model)
    base_experts = read_experts(model, selection.experts_by_layer)
    expected = {k: ExpertSpec(tuple(v.shape), v.dtype) for k, v in base_experts.items()}
    library.put_domain(config, selection)
    library.put_base(selection.model_id, selection.model_revision, str(Path(base_dir).resolve()))
    recorded = []
    with tempfile.TemporaryDirectory(prefix="connito-rebuild-") as tmp:
        for publication in _publications(chain, config.cycle):
            payload, block = publication.payload, publication.block
            try:
                state = fetch_global(
                    store, publication.hotkey, payload, Path(tmp) / f"{block}",
                    selection=selection, expected=expected, max_bytes=config.scoring.max_payload_bytes * 4,
                )  # fmt: skip
            except (StoreError, InvalidSubmission) as exc:
                logger.warning("rebuild skipped cycle=%d block=%d: %s", payload.cycle, block, exc)
                continue
            losses = heldout_losses(
                model,
                state.experts,
                restore=base_experts,
                data=data,
                scoring=config.scoring,
                seed=LIBRARY_EVAL_SEED,
            )
            draft = version_draft(
                state, config=config, selection=selection, ref=state.ref, block=block, losses=losses
            )
            record, _ = library.record(draft, state.experts)
            recorded.append(record)
    return recorded
