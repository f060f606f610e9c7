"""The validator's merge and publication: choose what to publish, record it, publish it, recompute it.

The lead merges the top accepted pseudo-gradients with the outer optimizer and publishes only a
model that beats the current global on held-out loss (and passes the general-domain guard);
failing that, the best single submission if it does; else nothing. Every other validator
recomputes the lead's merge from its record and adopts it only if the digest matches bit for bit.

May import: the protocol (merge, global state, commitments), ``connito.node.context`` and
``connito.node.validator_state``; never the validator itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from connito.config import DomainConfig
from connito.hub.base import StoreRef
from connito.library.model_card import MODEL_CARD_FILE, card_for_global, write_model_card
from connito.ml.outer import OuterState
from connito.node.context import NodeContext
from connito.node.validator_state import CycleResult
from connito.protocol.commitments import GlobalPayload, StoreKind, encode_commitment, short_digest
from connito.protocol.global_state import GLOBAL_FILES, GlobalState, save_global
from connito.protocol.heldout import LossFn
from connito.protocol.merge import (
    MergeInput,
    MergeRecord,
    OuterParams,
    adopt_single,
    apply_merge,
    record_digest,
    state_revision,
)
from connito.protocol.scoring import Candidate, SubmissionScore

logger = logging.getLogger(__name__)

__all__ = [
    "MergeChoice",
    "choose_merge",
    "merge_record",
    "save_global_folder",
    "publish_global",
    "recompute_merge",
    "with_merge",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeChoice:
    """What the lead publishes for a cycle and why."""

    decision: Literal["merged", "best_single"]
    experts: dict[str, torch.Tensor]
    outer: OuterState
    inputs: list[SubmissionScore]
    loss: float  # held-out domain loss of ``experts`` on the cycle's seeded sample


def choose_merge(
    result: CycleResult,
    top: list[SubmissionScore],
    candidates: dict[str, Candidate],
    *,
    global_state: GlobalState,
    config: DomainConfig,
    heldout_losses: LossFn,
) -> MergeChoice | None:
    """The spec's order: the merged model if it beats the global (and passes the general guard),
    else the best single submission if it does, else nothing (None)."""
    states = [candidates[s.hotkey].experts() for s in top]
    weights = [1.0 / len(top)] * len(top)
    merged_experts, merged_outer = apply_merge(global_state.outer, states, weights, config.merge)
    merged_loss, merged_general = heldout_losses(merged_experts, result.eval_seed)
    best = top[0]
    global_loss = result.global_domain_loss or float("inf")
    general_limit = (result.global_general_loss or float("inf")) * (1 + config.scoring.general_tolerance)
    general_limit = min(general_limit, result.general_ceiling or float("inf"))
    if merged_loss < global_loss and not merged_general > general_limit:
        return MergeChoice(
            decision="merged", experts=merged_experts, outer=merged_outer, inputs=top, loss=merged_loss
        )
    # scores were measured at the cycle's normalised step; what is published is the experts as sent
    experts = candidates[best.hotkey].experts()
    single_loss, single_general = heldout_losses(experts, result.eval_seed)
    if single_loss < global_loss and not single_general > general_limit:
        return MergeChoice(
            decision="best_single",
            experts=experts,
            outer=adopt_single(global_state.outer, experts),
            inputs=[best],
            loss=single_loss,
        )
    logger.info(
        "cycle=%d phase=merge decision=none merged_loss=%.4f global=%.4f",
        result.cycle,
        merged_loss,
        global_loss,
    )
    return None


def merge_record(
    ctx: NodeContext, result: CycleResult, choice: MergeChoice, *, global_state: GlobalState
) -> MergeRecord:
    """The record any node recomputes ``choice`` from: inputs, their digests and where they live."""
    rows = {r.hotkey: r for r in result.scores}
    merge = ctx.config.merge
    weight = 1.0 / len(choice.inputs)
    return MergeRecord(
        domain=ctx.config.name,
        cycle=result.cycle,
        parent_revision=global_state.revision,
        decision=choice.decision,
        inputs=tuple(
            MergeInput(
                hotkey=s.hotkey,
                uid=s.uid,
                tensors_sha256=rows[s.hotkey].tensors_sha256 or "",
                weight=weight,
                store_kind=rows[s.hotkey].store_kind or "",
                repo=rows[s.hotkey].repo or "",
                revision=rows[s.hotkey].revision or "",
            )
            for s in choice.inputs
        ),
        outer=OuterParams(
            lr=merge.outer_lr, momentum=merge.momentum, nesterov=merge.nesterov, clip_norm=merge.clip_norm
        ),
        outer_step_before=global_state.outer.step,
        result_revision=state_revision(choice.experts),
        global_domain_loss=result.global_domain_loss or 0.0,
        result_domain_loss=choice.loss,
        eval_seed=result.eval_seed,
        lead_hotkey=ctx.hotkey,
    )


def with_merge(result: CycleResult, record: MergeRecord) -> CycleResult:
    """``result`` with the published merge's decision, inputs, revision and loss."""
    return result.model_copy(
        update={
            "decision": record.decision,
            "merged": [i.hotkey for i in record.inputs],
            "result_revision": record.result_revision,
            "result_domain_loss": record.result_domain_loss,
        }
    )


def _global_folder(ctx: NodeContext, cycle: int) -> Path:
    return ctx.workdir / "global" / str(cycle)


def save_global_folder(ctx: NodeContext, new_global: GlobalState) -> Path:
    """``WORKDIR/global/CYCLE``, written once (a restart finds it complete and leaves it)."""
    folder = _global_folder(ctx, new_global.cycle)
    if not (folder / "outer_state.safetensors").exists():
        save_global(new_global, folder, config=ctx.config, selection=ctx.selection, hotkey=ctx.hotkey)
    return folder


def publish_global(ctx: NodeContext, new_global: GlobalState) -> tuple[StoreRef, int]:
    """Lead only: upload the new global and commit its location; returns (where, commit block).

    Raises:
        StoreError, ChainError: nothing is adopted yet; the caller retries the same merge.
    """
    assert new_global.record is not None
    folder = _global_folder(ctx, new_global.cycle)
    save_global(new_global, folder, config=ctx.config, selection=ctx.selection, hotkey=ctx.hotkey)
    ref = _upload_with_card(ctx, new_global, folder)
    payload = GlobalPayload(
        cycle=new_global.cycle,
        store_kind=cast(StoreKind, ref.kind),  # the payload model validates it
        repo=ref.repo,
        revision=ref.revision,
        record_digest=short_digest(record_digest(new_global.record)),
    )
    block = ctx.chain.commit(encode_commitment(payload))
    logger.info(
        "cycle=%d global published rev=%s repo=%s", new_global.cycle, new_global.revision[:12], ref.repo
    )
    return ref, block


def _upload_with_card(ctx: NodeContext, new_global: GlobalState, folder: Path) -> StoreRef:
    """Upload the global's files plus its model card (the repo's README.md).

    The card goes in a staging folder (``.tmp-*``, swept after a crash) next to hard links of
    the global's files: the global folder itself stays exactly what the strict loader accepts
    when a restarted validator reloads it.
    """
    staging = Path(tempfile.mkdtemp(prefix=".tmp-upload-", dir=folder.parent))
    try:
        for name in GLOBAL_FILES:
            os.link(folder / name, staging / name)
        card = card_for_global(new_global, config=ctx.config, selection=ctx.selection, base_dir=ctx.base_dir)
        write_model_card(card, staging)  # what this global is and where it came from
        return ctx.store.upload(
            staging,
            repo=ctx.hub_repo,
            files=(*GLOBAL_FILES, MODEL_CARD_FILE),
            message=f"global cycle {new_global.cycle}",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def recompute_merge(
    fetched: GlobalState,
    accepted: Callable[[], dict[str, Candidate]],
    *,
    global_state: GlobalState,
    config: DomainConfig,
) -> bool:
    """Recompute the lead's merge from its record and compare digests bit for bit.

    A merge whose parent is not our global, or whose inputs we did not verify ourselves, is
    adopted on the lead's word (True, with a WARNING); only a recomputation that disagrees is
    refused (False). ``accepted`` gives the candidates this validator verified for the record's
    cycle; it is read only when the parent matches.
    """
    record = fetched.record
    assert record is not None
    if record.parent_revision != global_state.revision:
        logger.warning(
            "cycle=%d global parent %s is not ours %s: adopting on the lead's word",
            record.cycle,
            record.parent_revision[:12],
            global_state.revision[:12],
        )
        return True
    candidates = accepted()
    missing = [
        i.hotkey
        for i in record.inputs
        if i.hotkey not in candidates or candidates[i.hotkey].tensors_sha256 != i.tensors_sha256
    ]
    if missing:
        logger.warning(
            "cycle=%d cannot recompute merge: inputs %s not verified here; adopting on the lead's word",
            record.cycle,
            missing,
        )
        return True
    states = [candidates[i.hotkey].experts() for i in record.inputs]
    if record.decision == "merged":
        experts, _ = apply_merge(global_state.outer, states, [i.weight for i in record.inputs], config.merge)
    else:
        experts = states[0]
    recomputed = state_revision(experts)
    if recomputed != record.result_revision:
        logger.error(
            "cycle=%d merge verification FAILED: recomputed %s, lead published %s",
            record.cycle,
            recomputed[:12],
            record.result_revision[:12],
        )
        return False
    logger.info("cycle=%d merge verified rev=%s", record.cycle, recomputed[:12])
    return True
