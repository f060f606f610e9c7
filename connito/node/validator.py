"""The validator: observe commitments, evaluate revealed submissions, set weights, merge or adopt.

One method per phase. Evaluation swaps each submission's experts into one resident model (never a
reload). The lead validator (highest stake with a permit) merges the top accepted pseudo-gradients
and publishes only a model that beats the current global on held-out loss; the others recompute
that merge from its record and adopt it only if the digest matches bit for bit. Every piece of
state is written atomically and each phase is idempotent, so a restart never merges twice.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from connito.chain.base import Neuron, lead_validator
from connito.errors import ChainError, InvalidSubmission, StoreError
from connito.fsutil import atomic_write, sweep_temp_files
from connito.hub.base import StoreRef
from connito.library.index import Library
from connito.library.recorder import record_global
from connito.ml.eval_pool import EvalPool
from connito.ml.modeling import load_model
from connito.ml.moe import read_experts, write_experts
from connito.ml.update_bound import max_weight_change
from connito.node.context import NodeContext, PhaseLoop
from connito.node.validator_state import CycleResult, ScoreRow, ValidatorState, score_row, submission_scores
from connito.protocol.checkpoint import ExpertSpec
from connito.protocol.global_state import (
    GLOBAL_FILES,
    GlobalState,
    adoptable_global,
    fetch_global,
    find_global_payload,
    genesis_global,
    save_global,
)
from connito.protocol.merge import (
    MergeInput,
    MergeRecord,
    OuterParams,
    adopt_single,
    apply_merge,
    record_digest,
    state_revision,
)
from connito.protocol.phases import (
    GlobalPayload,
    PhaseInfo,
    StoreKind,
    encode_commitment,
    eval_seed,
    seed_block,
    short_digest,
)
from connito.protocol.scoring import (
    Candidate,
    batch_losses,
    chain_weights,
    rank_weights,
    ranked,
    score_submissions,
    update_ema,
)
from connito.protocol.submissions import Observation, fetch_and_verify, observe_commitments, precheck

logger = logging.getLogger(__name__)

__all__ = ["Validator"]

DOWNLOAD_WORKERS = 4


@dataclass
class Validator:
    ctx: NodeContext
    poll_s: float = 1.0
    progress_bars: bool = True
    library: Library | None = None  # expert library to record each global version in (None: off)
    eval_devices: tuple[
        str, ...
    ] = ()  # score on one model replica per device (fewer than 2: the model alone)
    state: ValidatorState = field(default_factory=ValidatorState)
    global_state: GlobalState | None = None
    _model: torch.nn.Module | None = None
    _pool: EvalPool | None = None
    _candidates: dict[int, dict[str, Candidate]] = field(default_factory=dict)
    _base_state: dict[str, torch.Tensor] | None = None  # the base model's experts (the drift cap)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.ctx.workdir / "validator_state.json"

    def __post_init__(self) -> None:
        """Resume scores, EMA, observations and the adopted global state from the workdir."""
        sweep_temp_files(self.ctx.workdir)  # what a kill -9 left half-written
        self._load()

    def run(self, *, until_cycle: int | None = None) -> int:
        loop = PhaseLoop(
            self.ctx.chain, self.ctx.config, poll_s=self.poll_s, role="validator", metrics=self.ctx.metrics
        )
        return loop.run(self.tick, until_cycle=until_cycle)

    def tick(self, block: int, info: PhaseInfo) -> None:
        if self.global_state is None:
            self.global_state = self._genesis()  # the adopted state from the workdir, or genesis
        self.observe()
        if info.cycle < 0:
            return
        if info.phase == "evaluate" and info.cycle not in self.state.results:
            self.evaluate(info.cycle)
        if info.phase in ("evaluate", "merge"):
            self.set_weights(info.cycle)
        if info.phase == "merge":
            if self._is_lead():
                self.merge(info.cycle)
            else:
                self.sync_global(info.cycle + 1)
        elif info.phase in ("train", "commit", "reveal"):
            self.sync_global(info.cycle)

    # -- phases ------------------------------------------------------------------------------

    def observe(self) -> None:
        """Record in-window commits and reveals while they are on chain."""
        before = self.state.model_dump_json()
        neurons = self.ctx.chain.metagraph()
        validators = {n.hotkey for n in neurons if n.validator_permit}
        observe_commitments(
            self.state.observed, self.ctx.chain.commitments(), self.ctx.config, ignore=validators
        )
        if self.state.model_dump_json() != before:
            self._save()

    def evaluate(self, cycle: int) -> None:
        """Verify and score every submission of ``cycle`` on its seeded held-out sample."""
        self.sync_global(cycle)
        assert self.global_state is not None
        config = self.ctx.config
        seed = eval_seed(
            seed_block_hash=self.ctx.chain.block_hash(seed_block(cycle, config.cycle)),
            domain=config.name,
            cycle=cycle,
        )
        neurons = self.ctx.chain.metagraph()
        uid_of = {n.hotkey: n.uid for n in neurons}
        self._forget_reregistered(neurons)
        registered = {n.hotkey: n.registered_block for n in neurons}
        observed = {
            h: o
            for h, o in self.state.observed.get(cycle, {}).items()
            if h in registered and (o.commit_block is None or o.commit_block >= registered[h])
        }
        rows, candidates, outage = self._verify_all(cycle, observed, uid_of)
        result = CycleResult(cycle=cycle, eval_seed=seed, global_revision=self.global_state.revision)
        if outage:
            logger.warning("cycle=%d phase=evaluate skipped: store unreachable for every submission", cycle)
            self._record(result.model_copy(update={"skipped": True, "decision": "none"}))
            return
        model = self._resident_model()
        domain_batches = self.ctx.data.heldout_sample(
            seed, config.scoring.eval_batches, config.scoring.eval_batch_size
        )
        general_batches = (
            self.ctx.data.general_sample(seed, config.scoring.general_batches, config.scoring.eval_batch_size)
            if config.scoring.general_batches
            else []
        )
        ceiling = self._general_ceiling(model, general_batches)  # guards what the lead publishes
        (global_domain, global_general), scores = score_submissions(
            model,
            self.global_state.experts,
            list(candidates.values()),
            domain_batches=domain_batches,
            general_batches=general_batches,
            config=config.scoring,
            max_change=self._max_change(),
            progress=self.progress_bars,
            pool=self._eval_pool(model),
        )
        rows.update({s.hotkey: score_row(s, rows.get(s.hotkey)) for s in scores})
        cycle_weights = rank_weights(scores, config.scoring)
        self.state.ema = update_ema(
            self.state.ema, cycle_weights, alpha=config.scoring.ema_alpha, registered=set(uid_of)
        )
        weights = chain_weights(
            self.state.ema, uid_of, burn_share=config.scoring.burn_share, owner_uid=config.scoring.owner_uid
        )
        # accepted candidates hold no tensors (read from their download when merged); keep two cycles
        self._candidates = {c: v for c, v in self._candidates.items() if c >= cycle - 1}
        self._candidates[cycle] = {s.hotkey: candidates[s.hotkey] for s in scores if s.accepted}
        self._prune_downloads(keep_from=cycle - 1)
        result = result.model_copy(
            update={
                "global_domain_loss": global_domain,
                "global_general_loss": global_general,
                "general_ceiling": ceiling,
                "scores": sorted(rows.values(), key=lambda r: r.uid),
                "cycle_weights": cycle_weights,
                "weights": weights,
            }
        )
        self._record(result)
        accepted = sum(r.accepted for r in rows.values())
        logger.info(
            "cycle=%d phase=evaluate submissions=%d accepted=%d global_loss=%.4f",
            cycle,
            len(rows),
            accepted,
            global_domain,
        )

    def _prune_downloads(self, *, keep_from: int) -> None:
        """Delete submission downloads of cycles before ``keep_from``: disk stays bounded by two cycles.

        Only the last two cycles' candidates can still be merged or re-verified (``_candidates``);
        older folders would otherwise grow by one payload per submission forever.
        """
        root = self.ctx.workdir / "downloads"
        if not root.is_dir():
            return
        for folder in root.iterdir():
            name = folder.name.removeprefix("global-")
            if name.lstrip("-").isdigit() and int(name) < keep_from:
                shutil.rmtree(folder, ignore_errors=True)
                logger.info("pruned downloads %s", folder.name)

    def _general_ceiling(self, model: torch.nn.Module, general_batches: list[torch.Tensor]) -> float | None:
        """The base experts' general loss on this cycle's sample x (1 + ``general_drift_limit``).

        Measured on the same batches as the submissions, so the cap moves with the sample but
        never with the global: forgetting cannot add up over cycles.
        """
        limit = self.ctx.config.scoring.general_drift_limit
        if limit is None or not general_batches:
            return None
        assert self.global_state is not None and self._base_state is not None
        try:
            write_experts(model, self._base_state)
            base_general = sum(batch_losses(model, general_batches)) / len(general_batches)
        finally:
            write_experts(model, self.global_state.experts)
        return base_general * (1 + limit)

    def _max_change(self) -> float | None:
        """The per-weight move bound for this cycle's global (``scoring.update_bound_factor``)."""
        assert self.global_state is not None
        factor = self.ctx.config.scoring.update_bound_factor
        if factor is None:
            return None
        return max_weight_change(self.ctx.config.training, self.global_state.experts, factor=factor)

    def _forget_reregistered(self, neurons: list[Neuron]) -> None:
        """A hotkey registered anew since its EMA was earned starts from zero EMA.

        Deregistration frees the uid, so a returning hotkey is a new participant: carrying its
        old EMA would pay it for a previous life. (Unregistered hotkeys are dropped by
        ``update_ema``; an EMA with no recorded registration, from an older state file, is kept.)
        """
        current = {n.hotkey: n.registered_block for n in neurons}
        known = self.state.registered_at
        stale = [h for h in self.state.ema if h in known and h in current and known[h] != current[h]]
        for hotkey in stale:
            logger.info("hotkey=%s registration changed: EMA reset", hotkey)
            del self.state.ema[hotkey]
        self.state.registered_at = current

    def set_weights(self, cycle: int) -> None:
        """Set this cycle's weights once; a rate-limited or failed transaction is retried next block."""
        result = self.state.results.get(cycle)
        if result is None or result.skipped or result.weights_set_block is not None:
            return
        scoring = self.ctx.config.scoring
        try:
            # uids are read at send time: a uid freed or re-registered since evaluation gets nothing
            uid_of = {n.hotkey: n.uid for n in self.ctx.chain.metagraph()}
            weights = chain_weights(
                self.state.ema, uid_of, burn_share=scoring.burn_share, owner_uid=scoring.owner_uid
            )
            if not weights:
                return
            block = self.ctx.chain.set_weights(weights)
        except ChainError as exc:
            logger.warning("cycle=%d set_weights failed (retry next block): %s", cycle, exc)
            return
        self._record(result.model_copy(update={"weights": weights, "weights_set_block": block}))
        logger.info("cycle=%d weights set block=%d uids=%d", cycle, block, len(weights))

    def merge(self, cycle: int) -> None:
        """Lead only: merge the top accepted submissions; publish only a model that beats the global."""
        result = self.state.results.get(cycle)
        if result is None or result.decision != "pending":
            return
        if self._published(cycle):
            return
        assert self.global_state is not None
        top = [
            s for s in ranked(submission_scores(result)) if s.hotkey in self._candidates_for(cycle, result)
        ][: self.ctx.config.merge.top_n]
        if not top:
            self._record(result.model_copy(update={"decision": "none"}))
            logger.info("cycle=%d phase=merge decision=none (no accepted submission)", cycle)
            return
        candidates = self._candidates_for(cycle, result)
        states = [candidates[s.hotkey].experts() for s in top]
        weights = [1.0 / len(top)] * len(top)
        merged_experts, merged_outer = apply_merge(
            self.global_state.outer, states, weights, self.ctx.config.merge
        )
        merged_loss, merged_general = self._heldout_losses(merged_experts, result.eval_seed)
        best = top[0]
        global_loss = result.global_domain_loss or float("inf")
        general_limit = (result.global_general_loss or float("inf")) * (
            1 + self.ctx.config.scoring.general_tolerance
        )
        general_limit = min(general_limit, result.general_ceiling or float("inf"))
        # the spec's order: the merged model if it beats the global (and passes the general guard),
        # else the best single submission if it does, else nothing
        if merged_loss < global_loss and not merged_general > general_limit:
            decision, experts, outer, inputs, loss = "merged", merged_experts, merged_outer, top, merged_loss
        elif (
            best.domain_loss is not None
            and best.domain_loss < global_loss
            and not (best.general_loss or 0.0) > general_limit
        ):
            experts = candidates[best.hotkey].experts()
            decision, outer, inputs, loss = (
                "best_single",
                adopt_single(self.global_state.outer, experts),
                [best],
                best.domain_loss,
            )
        else:
            self._record(result.model_copy(update={"decision": "none"}))
            logger.info(
                "cycle=%d phase=merge decision=none merged_loss=%.4f global=%.4f",
                cycle,
                merged_loss,
                global_loss,
            )
            return
        record = self._merge_record(cycle, result, decision, inputs, experts, loss)
        new_global = GlobalState(
            cycle=cycle, revision=record.result_revision, experts=experts, outer=outer, record=record
        )
        try:
            self._publish(new_global)
        except (ChainError, StoreError) as exc:  # nothing adopted yet: the next block retries the same merge
            logger.warning("cycle=%d merge publication failed (retry next block): %s", cycle, exc)
            return
        self._adopt(new_global)
        self._record(
            result.model_copy(
                update={
                    "decision": decision,
                    "merged": [s.hotkey for s in inputs],
                    "result_revision": record.result_revision,
                    "result_domain_loss": loss,
                }
            )
        )
        logger.info(
            "cycle=%d phase=merge decision=%s inputs=%d loss=%.4f global=%.4f",
            cycle,
            decision,
            len(inputs),
            loss,
            global_loss,
        )

    def sync_global(self, cycle: int) -> None:
        """Adopt the lead's publication from before ``cycle``, after recomputing it where possible."""
        if self.global_state is None:
            self.global_state = self._genesis()
        found = adoptable_global(
            self.ctx.chain, self.ctx.config.cycle, newer_than=self.global_state.cycle, before=cycle
        )
        if found is None:
            return
        lead, payload = found
        try:
            fetched = fetch_global(
                self.ctx.store,
                lead,
                payload,
                self.ctx.workdir / "downloads" / f"global-{payload.cycle}",
                selection=self.ctx.selection,
                expected=self._expected(),
                max_bytes=self.ctx.config.scoring.max_payload_bytes * 4,
            )
        except (StoreError, InvalidSubmission) as exc:
            logger.warning("global fetch failed cycle=%d: %s", payload.cycle, exc)
            return
        if not self._verify_merge(fetched):
            return
        self._adopt(fetched)
        result = self.state.results.get(payload.cycle)
        if result is not None and lead != self.ctx.hotkey:
            self._record(
                result.model_copy(update={"decision": "adopted", "result_revision": fetched.revision})
            )

    # -- helpers: verification ---------------------------------------------------------------

    def _verify_all(self, cycle: int, observed: dict[str, Observation], uid_of: dict[str, int]):
        rows: dict[str, ScoreRow] = {}
        todo: dict[str, Observation] = {}
        for hotkey, entry in observed.items():
            rejection = precheck(entry)
            if rejection is not None:
                rows[hotkey] = ScoreRow(
                    hotkey=hotkey,
                    uid=uid_of[hotkey],
                    accepted=False,
                    reason=rejection[0],
                    detail=rejection[1],
                )
            else:
                todo[hotkey] = entry
        candidates: dict[str, Candidate] = {}
        unreachable = 0
        expected = self._expected()
        global_state = self.global_state
        assert global_state is not None
        root = self.ctx.workdir / "downloads" / str(cycle)

        def verify(hotkey: str) -> Candidate | ScoreRow:
            entry = todo[hotkey]
            dest = root / hotkey
            shutil.rmtree(dest, ignore_errors=True)
            try:
                verified = fetch_and_verify(
                    self.ctx.store,
                    entry,
                    dest,
                    hotkey=hotkey,
                    uid=uid_of[hotkey],
                    cycle=cycle,
                    config=self.ctx.config,
                    selection=self.ctx.selection,
                    expected=expected,
                    global_revision=global_state.revision,
                    global_experts=global_state.experts,
                )
            except (InvalidSubmission, StoreError) as exc:
                reason = exc.reason if isinstance(exc, InvalidSubmission) else f"store_{exc.reason}"
                logger.warning("cycle=%d rejected hotkey=%s reason=%s: %s", cycle, hotkey, reason, exc)
                return ScoreRow(
                    hotkey=hotkey, uid=uid_of[hotkey], accepted=False, reason=reason, detail=str(exc)[:300]
                )
            # the verified tensors stay in dest and are read again when used: memory does not grow with N
            return self._on_disk(
                cycle,
                hotkey=hotkey,
                uid=verified.uid,
                commit_block=verified.commit_block,
                tensors_sha256=verified.tensors_sha256,
            )

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

    def _verify_merge(self, fetched: GlobalState) -> bool:
        """Recompute the lead's merge from its record and compare digests bit for bit."""
        record = fetched.record
        assert record is not None and self.global_state is not None
        if record.parent_revision != self.global_state.revision:
            logger.warning(
                "cycle=%d global parent %s is not ours %s: adopting on the lead's word",
                record.cycle,
                record.parent_revision[:12],
                self.global_state.revision[:12],
            )
            return True
        candidates = self._candidates_for(record.cycle, self.state.results.get(record.cycle))
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
            experts, _ = apply_merge(
                self.global_state.outer, states, [i.weight for i in record.inputs], self.ctx.config.merge
            )
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

    def _candidates_for(self, cycle: int, result: CycleResult | None) -> dict[str, Candidate]:
        """Accepted candidates of ``cycle``: from memory, or reloaded from the download cache after a restart."""
        if cycle in self._candidates or result is None:
            return self._candidates.get(cycle, {})
        loaded = {}
        for row in result.scores:
            if not row.accepted:
                continue
            candidate = self._on_disk(
                cycle,
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
        self._candidates[cycle] = loaded
        return loaded

    def _on_disk(
        self, cycle: int, *, hotkey: str, uid: int, commit_block: int, tensors_sha256: str
    ) -> Candidate:
        """A candidate whose experts are read from its verified download folder each time they are used."""
        from connito.protocol.checkpoint import load_checkpoint

        assert self.global_state is not None
        folder = self.ctx.workdir / "downloads" / str(cycle) / hotkey
        expected, max_bytes = self._expected(), self.ctx.config.scoring.max_payload_bytes
        base, base_revision = self.global_state.experts, self.global_state.revision  # an int8 delta's base

        def load() -> dict[str, torch.Tensor]:
            manifest, state = load_checkpoint(
                folder,
                selection=self.ctx.selection,
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

    # -- helpers: merge and publication ------------------------------------------------------

    def _merge_record(self, cycle, result, decision, inputs, experts, loss) -> MergeRecord:
        rows = {r.hotkey: r for r in result.scores}
        merge = self.ctx.config.merge
        assert self.global_state is not None
        weight = 1.0 / len(inputs)
        return MergeRecord(
            domain=self.ctx.config.name,
            cycle=cycle,
            parent_revision=self.global_state.revision,
            decision=decision,
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
                for s in inputs
            ),
            outer=OuterParams(
                lr=merge.outer_lr, momentum=merge.momentum, nesterov=merge.nesterov, clip_norm=merge.clip_norm
            ),
            outer_step_before=self.global_state.outer.step,
            result_revision=state_revision(experts),
            global_domain_loss=result.global_domain_loss or 0.0,
            result_domain_loss=loss,
            eval_seed=result.eval_seed,
            lead_hotkey=self.ctx.hotkey,
        )

    def _publish(self, new_global: GlobalState) -> None:
        assert new_global.record is not None
        folder = self.ctx.workdir / "global" / str(new_global.cycle)
        save_global(
            new_global, folder, config=self.ctx.config, selection=self.ctx.selection, hotkey=self.ctx.hotkey
        )
        ref = self.ctx.store.upload(
            folder, repo=self.ctx.hub_repo, files=GLOBAL_FILES, message=f"global cycle {new_global.cycle}"
        )
        payload = GlobalPayload(
            cycle=new_global.cycle,
            store_kind=cast(StoreKind, ref.kind),  # the payload model validates it
            repo=ref.repo,
            revision=ref.revision,
            record_digest=short_digest(record_digest(new_global.record)),
        )
        block = self.ctx.chain.commit(encode_commitment(payload))
        logger.info(
            "cycle=%d global published rev=%s repo=%s", new_global.cycle, new_global.revision[:12], ref.repo
        )
        self._record_in_library(new_global, ref=ref, block=block)

    def _published(self, cycle: int) -> bool:
        """True when our own publication for ``cycle`` is already on chain (a restart after commit)."""
        found = find_global_payload(self.ctx.chain)
        if found is None or found[0] != self.ctx.hotkey or found[2].cycle != cycle:
            return False
        self.sync_global(cycle + 1)
        result = self.state.results[cycle]
        if (
            self.global_state is not None
            and self.global_state.cycle == cycle
            and self.global_state.record is not None
        ):
            record = self.global_state.record
            self._record(
                result.model_copy(
                    update={
                        "decision": record.decision,
                        "merged": [i.hotkey for i in record.inputs],
                        "result_revision": record.result_revision,
                        "result_domain_loss": record.result_domain_loss,
                    }
                )
            )
        return True

    def _adopt(self, new_global: GlobalState) -> None:
        folder = self.ctx.workdir / "global" / str(new_global.cycle)
        if not (folder / "outer_state.safetensors").exists():
            save_global(
                new_global,
                folder,
                config=self.ctx.config,
                selection=self.ctx.selection,
                hotkey=self.ctx.hotkey,
            )
        self.global_state = new_global
        self.state.global_cycle = new_global.cycle
        if self._model is not None:
            write_experts(self._model, new_global.experts)
        self._save()
        logger.info("global adopted cycle=%d rev=%s", new_global.cycle, new_global.revision[:12])
        # non-leads record too: every validator's library is complete
        self._record_in_library(new_global, ref=new_global.ref, block=None)

    def _record_in_library(self, new_global: GlobalState, *, ref: StoreRef | None, block: int | None) -> None:
        if self.library is None:
            return
        record_global(
            self.library,
            new_global,
            config=self.ctx.config,
            selection=self.ctx.selection,
            chain=self.ctx.chain,
            base_dir=self.ctx.base_dir,
            ref=ref,
            block=block,
            losses=self._heldout_losses,
        )

    # -- helpers: model and state ------------------------------------------------------------

    def _is_lead(self) -> bool:
        lead = lead_validator(self.ctx.chain.metagraph())
        return lead is not None and lead.hotkey == self.ctx.hotkey

    def _resident_model(self) -> torch.nn.Module:
        """The loaded base model holding the adopted global experts."""
        model = self._resident_model_raw()
        assert self.global_state is not None
        write_experts(model, self.global_state.experts)
        return model

    def _genesis(self) -> GlobalState:
        """The adopted global state saved in the workdir, or genesis (the base model's experts)."""
        base = genesis_global(read_experts(self._resident_model_raw(), self.ctx.selection.experts_by_layer))
        self._base_state = base.experts
        if self.state.global_cycle < 0:
            return base
        from connito.protocol.global_state import load_global

        folder = self.ctx.workdir / "global" / str(self.state.global_cycle)
        expected = {k: ExpertSpec(tuple(v.shape), v.dtype) for k, v in base.experts.items()}
        return load_global(
            folder,
            selection=self.ctx.selection,
            expected=expected,
            max_bytes=2**40,
            cycle=self.state.global_cycle,
        )

    def _eval_pool(self, model: torch.nn.Module) -> EvalPool | None:
        """The resident model and a replica, loaded from the base folder, on each other eval device."""
        if len(self.eval_devices) > 1 and self._pool is None:
            load = lambda device: load_model(self.ctx.base_dir, self.ctx.config.model).to(device)  # noqa: E731
            self._pool = EvalPool.replicate(model, self.eval_devices, load=load)
        return self._pool

    def _resident_model_raw(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_model(self.ctx.base_dir, self.ctx.config.model).to(self.ctx.device)
        return self._model

    def _expected(self) -> dict[str, ExpertSpec]:
        assert self.global_state is not None
        return {k: ExpertSpec(tuple(v.shape), v.dtype) for k, v in self.global_state.experts.items()}

    def _heldout_losses(self, experts: dict[str, torch.Tensor], seed: int) -> tuple[float, float]:
        """Mean (domain, general) loss of ``experts`` on the cycle's seeded samples; the model is restored."""
        assert self.global_state is not None
        scoring = self.ctx.config.scoring
        domain = self.ctx.data.heldout_sample(seed, scoring.eval_batches, scoring.eval_batch_size)
        general = (
            self.ctx.data.general_sample(seed, scoring.general_batches, scoring.eval_batch_size)
            if scoring.general_batches
            else []
        )
        model = self._resident_model()
        try:
            write_experts(model, experts)
            domain_losses = batch_losses(model, domain)
            general_losses = batch_losses(model, general)
        finally:
            write_experts(model, self.global_state.experts)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return mean(domain_losses), mean(general_losses)

    def _record(self, result: CycleResult) -> None:
        self.state.results[result.cycle] = result
        self.ctx.metrics.observe_cycle(result)
        self._save()
        atomic_write(
            self.ctx.workdir / "cycles" / f"{result.cycle}.json", result.model_dump_json(indent=2).encode()
        )

    def _save(self) -> None:
        for cycle in sorted(self.state.observed)[:-3]:
            del self.state.observed[cycle]
        atomic_write(self._state_path, self.state.model_dump_json().encode())

    def _load(self) -> None:
        if self._state_path.exists():
            self.state = ValidatorState.model_validate_json(self._state_path.read_bytes())
            logger.info(
                "validator resumed global_cycle=%d cycles=%s",
                self.state.global_cycle,
                sorted(self.state.results),
            )
