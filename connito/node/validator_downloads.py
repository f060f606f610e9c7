"""The validator's submission downloads: fetch and verify each revealed checkpoint, keep the accepted.

A verified download stays in ``WORKDIR/downloads/CYCLE/HOTKEY`` and its experts are read again
from disk each time they are used, so memory does not grow with the number of submissions. Only
the last two cycles can still be merged or re-verified: older folders are pruned, and after a
restart the accepted candidates are reloaded from their folders (an unreadable one is left out).

May import: the protocol (submissions, checkpoint loader, scoring records), ``connito.node.context``
and ``connito.node.validator_state``; never the validator itself.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from connito.errors import InvalidSubmission, StoreError
from connito.node.context import NodeContext
from connito.node.validator_state import CycleResult, ScoreRow
from connito.protocol.checkpoint import ExpertSpec
from connito.protocol.global_state import GlobalState, expected_specs
from connito.protocol.scoring import Candidate
from connito.protocol.strict_loader import load_checkpoint
from connito.protocol.submissions import Observation, fetch_and_verify, precheck

logger = logging.getLogger(__name__)

__all__ = ["DOWNLOAD_WORKERS", "SubmissionDownloads", "downloads_root", "prune_downloads"]

DOWNLOAD_WORKERS = 4
KEEP_CYCLES = 2  # the evaluated cycle and the one before: what a merge or its recomputation reads


@dataclass
class SubmissionDownloads:
    """Verified submissions of the last two cycles, on disk, and the accepted ones among them.

    Holds only its cache of accepted candidates: the node context (store, config, workdir) is
    passed to each call, so a node whose context is replaced keeps one cache.
    """

    progress_bars: bool = True
    _accepted: dict[int, dict[str, Candidate]] = field(default_factory=dict)

    def verify_all(
        self,
        ctx: NodeContext,
        cycle: int,
        observed: dict[str, Observation],
        uid_of: dict[str, int],
        global_state: GlobalState,
    ) -> tuple[dict[str, ScoreRow], dict[str, Candidate], bool]:
        """Precheck, download and verify every observed submission of ``cycle`` (in parallel).

        Returns a score row per hotkey (not yet accepted: scoring decides), the verified
        candidates, and whether the store was unreachable for every submission (an outage,
        which skips the cycle rather than zeroing honest miners).
        """
        rows: dict[str, ScoreRow] = {}
        todo: dict[str, Observation] = {}
        for hotkey, entry in observed.items():
            rejection = precheck(entry)
            if rejection is not None:
                reason, detail = rejection
                rows[hotkey] = ScoreRow(
                    hotkey=hotkey, uid=uid_of[hotkey], accepted=False, reason=reason, detail=detail
                )
            else:
                todo[hotkey] = entry

        expected = expected_specs(global_state)

        def verify(hotkey: str) -> Candidate | ScoreRow:
            return self._verify_one(ctx, cycle, hotkey, todo[hotkey], uid_of[hotkey], global_state, expected)

        with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
            outcomes = dict(
                zip(
                    sorted(todo),
                    tqdm(
                        pool.map(verify, sorted(todo)),
                        total=len(todo),
                        desc="download",
                        unit="submission",
                        disable=not self.progress_bars,
                    ),
                    strict=True,
                )
            )
        candidates: dict[str, Candidate] = {}
        unreachable = 0
        for hotkey in sorted(todo):
            outcome = outcomes[hotkey]
            entry = todo[hotkey]
            location = {
                "repo": entry.reveal_repo,
                "revision": entry.reveal_revision,
                "store_kind": entry.reveal_kind,
            }
            if isinstance(outcome, Candidate):
                candidates[hotkey] = outcome
                rows[hotkey] = ScoreRow(
                    hotkey=hotkey,
                    uid=outcome.uid,
                    accepted=False,
                    commit_block=outcome.commit_block,
                    tensors_sha256=outcome.tensors_sha256,
                    **location,
                )
            else:
                unreachable += outcome.reason == "store_unreachable"
                rows[hotkey] = outcome.model_copy(update=location)
        outage = bool(todo) and unreachable == len(todo)
        return rows, candidates, outage

    def _verify_one(
        self,
        ctx: NodeContext,
        cycle: int,
        hotkey: str,
        entry: Observation,
        uid: int,
        global_state: GlobalState,
        expected: dict[str, ExpertSpec],
    ) -> Candidate | ScoreRow:
        dest = downloads_root(ctx) / str(cycle) / hotkey
        shutil.rmtree(dest, ignore_errors=True)
        try:
            verified = fetch_and_verify(
                ctx.store,
                entry,
                dest,
                hotkey=hotkey,
                uid=uid,
                cycle=cycle,
                config=ctx.config,
                selection=ctx.selection,
                expected=expected,
                global_revision=global_state.revision,
                global_experts=global_state.experts,
            )
        except (InvalidSubmission, StoreError) as exc:
            reason = exc.reason if isinstance(exc, InvalidSubmission) else f"store_{exc.reason}"
            logger.warning("cycle=%d rejected hotkey=%s reason=%s: %s", cycle, hotkey, reason, exc)
            return ScoreRow(hotkey=hotkey, uid=uid, accepted=False, reason=reason, detail=str(exc)[:300])
        # the verified tensors stay in dest and are read again when used: memory does not grow with N
        return self.on_disk(
            ctx,
            cycle,
            global_state,
            hotkey=hotkey,
            uid=verified.uid,
            commit_block=verified.commit_block,
            tensors_sha256=verified.tensors_sha256,
        )

    def on_disk(
        self,
        ctx: NodeContext,
        cycle: int,
        global_state: GlobalState,
        *,
        hotkey: str,
        uid: int,
        commit_block: int,
        tensors_sha256: str,
    ) -> Candidate:
        """A candidate whose experts are read from its verified download folder each time they are used."""
        folder = downloads_root(ctx) / str(cycle) / hotkey
        expected, max_bytes = expected_specs(global_state), ctx.config.scoring.max_payload_bytes
        base, base_revision = global_state.experts, global_state.revision  # an int8 delta's base

        def load() -> dict[str, torch.Tensor]:
            manifest, state = load_checkpoint(
                folder,
                selection=ctx.selection,
                expected=expected,
                max_bytes=max_bytes,
                base=base,
                base_revision=base_revision,
            )
            if tensors_sha256 and manifest.tensors_sha256 != tensors_sha256:
                raise InvalidSubmission(
                    "digest_mismatch", f"{folder}: changed since it was verified", hotkey=hotkey, cycle=cycle
                )
            return state

        return Candidate(
            hotkey=hotkey, uid=uid, commit_block=commit_block, tensors_sha256=tensors_sha256, load=load
        )

    def keep_accepted(self, ctx: NodeContext, cycle: int, accepted: dict[str, Candidate]) -> None:
        """Remember ``cycle``'s accepted candidates; forget and delete what is older than two cycles."""
        keep_from = cycle - (KEEP_CYCLES - 1)
        # accepted candidates hold no tensors (read from their download when merged)
        self._accepted = {c: v for c, v in self._accepted.items() if c >= keep_from}
        self._accepted[cycle] = accepted
        prune_downloads(ctx, keep_from=keep_from)

    def accepted(
        self, ctx: NodeContext, cycle: int, result: CycleResult | None, global_state: GlobalState
    ) -> dict[str, Candidate]:
        """Accepted candidates of ``cycle``: from memory, or reloaded from the download cache after a restart."""
        if cycle in self._accepted or result is None:
            return self._accepted.get(cycle, {})
        loaded = {}
        for row in result.scores:
            if not row.accepted:
                continue
            candidate = self.on_disk(
                ctx,
                cycle,
                global_state,
                hotkey=row.hotkey,
                uid=row.uid,
                commit_block=row.commit_block,
                tensors_sha256=row.tensors_sha256 or "",
            )
            try:
                candidate.experts()  # an unreadable download is left out now, not at merge time
            except InvalidSubmission:
                continue
            loaded[row.hotkey] = candidate
        self._accepted[cycle] = loaded
        return loaded


def downloads_root(ctx: NodeContext) -> Path:
    """Where a validator keeps downloads: ``WORKDIR/downloads/CYCLE/HOTKEY`` and ``global-CYCLE``."""
    return ctx.workdir / "downloads"


def prune_downloads(ctx: NodeContext, *, keep_from: int) -> None:
    """Delete submission downloads of cycles before ``keep_from``: disk stays bounded by two cycles.

    Only the last two cycles' candidates can still be merged or re-verified; older folders
    would otherwise grow by one payload per submission forever.
    """
    root = downloads_root(ctx)
    if not root.is_dir():
        return
    for folder in root.iterdir():
        name = folder.name.removeprefix("global-")
        if name.lstrip("-").isdigit() and int(name) < keep_from:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("pruned downloads %s", folder.name)
