"""The validator: observe commitments, evaluate revealed submissions, set weights, merge or adopt.

One method per phase; this room keeps the phase logic and the persisted state, and hands the
jobs to its neighbours: ``validator_downloads`` (fetch and verify submissions, keep the accepted),
``validator_merge`` (choose, record, publish and recompute a merge), ``global_sync`` (pull the
lead's global) and ``validator_state`` (what survives a restart). Evaluation swaps each
submission's experts into one resident model (never a reload). The lead validator (highest stake
with a permit) publishes only a model that beats the current global on held-out loss; the others
adopt it only after recomputing it bit for bit. Every piece of state is written atomically and
each phase is idempotent, so a restart never merges twice.

May import: the protocol, the ML core, the library (to record versions) and ``connito.node``'s
context and validator rooms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from connito.errors import ChainError, StoreError
from connito.fsutil import atomic_write, sweep_temp_files
from connito.hub.base import StoreRef
from connito.library.index import Library
from connito.library.recorder import record_global
from connito.ml.eval_pool import EvalPool
from connito.ml.modeling import load_model
from connito.ml.moe import read_experts, write_experts
from connito.ml.update_bound import max_weight_change
from connito.node.context import NodeContext, node_loop
from connito.node.disk_retention import Retention
from connito.node.failover import publication_counts, should_publish
from connito.node.global_sync import held_global, pull_global
from connito.node.startup_checks import load_state_file
from connito.node.validator_downloads import SubmissionDownloads, downloads_root
from connito.node.validator_history import observe_window_ends, previous_step_norm, remember_accepted
from connito.node.validator_merge import (
    choose_merge,
    merge_record,
    publish_global,
    recompute_merge,
    save_global_folder,
    with_merge,
)
from connito.node.validator_state import CycleResult, ValidatorState, score_row, submission_scores
from connito.protocol.commitments import eval_seed
from connito.protocol.global_state import (
    GlobalState,
    genesis_global,
)
from connito.protocol.heldout import general_ceiling, heldout_losses, seeded_samples
from connito.protocol.own_work import OwnWorkProbe
from connito.protocol.phases import PhaseInfo, seed_block
from connito.protocol.publication import publication_of_cycle
from connito.protocol.replay import MERGE_SOURCE, ReplayHistory
from connito.protocol.scoring import Candidate, pseudo_gradient, score_submissions
from connito.protocol.submissions import observe_commitments
from connito.protocol.version import PROTOCOL_VERSION
from connito.protocol.weights import chain_weights, rank_weights, ranked, update_ema

logger = logging.getLogger(__name__)

__all__ = ["Validator"]


@dataclass
class Validator:
    ctx: NodeContext
    poll_s: float = 1.0
    progress_bars: bool = True
    library: Library | None = None  # expert library to record each global version in (None: off)
    eval_devices: tuple[str, ...] = ()  # one model replica per eval device (fewer than 2: the model alone)
    state: ValidatorState = field(default_factory=ValidatorState)
    global_state: GlobalState | None = None
    _model: torch.nn.Module | None = None
    _pool: EvalPool | None = None
    _downloads: SubmissionDownloads = field(init=False)
    _retention: Retention = field(init=False)
    _base_state: dict[str, torch.Tensor] | None = None  # the base model's experts (the drift cap)
    _watching_since: int | None = None  # first block this process observed the chain at
    _history: ReplayHistory = field(init=False)  # earlier cycles' accepted and merged updates

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.ctx.workdir / "validator_state.json"

    def __post_init__(self) -> None:
        """Resume scores, EMA, observations and the adopted global state from the workdir."""
        sweep_temp_files(self.ctx.workdir)  # what a kill -9 left half-written
        self._downloads = SubmissionDownloads(progress_bars=self.progress_bars)
        self._history = ReplayHistory(self.ctx.workdir / "replay")
        self._retention = Retention(self.ctx)
        self._load()

    def run(self, *, until_cycle: int | None = None) -> int:
        loop = node_loop(self.ctx, role="validator", poll_s=self.poll_s)  # checks the protocol version
        return loop.run(self.tick, until_cycle=until_cycle)

    def tick(self, block: int, info: PhaseInfo) -> None:
        if self.global_state is None:
            self.global_state = self._genesis()  # the adopted state from the workdir, or genesis
        if self._retention.at_cycle(info.cycle, global_cycle=self.state.global_cycle, state=self.state):
            self._save()  # results older than ctx.keep_cycles dropped, with their files
        self.observe()
        if info.cycle < 0:
            return
        if info.phase == "evaluate" and info.cycle not in self.state.results:
            self.evaluate(info.cycle)
        if info.phase in ("evaluate", "merge"):
            self.set_weights(info.cycle)
        if info.phase == "merge":
            if should_publish(self.ctx, block=block, cycle=info.cycle):  # the lead, or its stand-in
                self.merge(info.cycle)
            else:
                self.sync_global(info.cycle + 1)
        elif info.phase in ("train", "commit", "reveal"):
            self.sync_global(info.cycle)

    # -- phases ------------------------------------------------------------------------------

    def observe(self) -> None:
        """Record in-window commits and reveals while they are on chain."""
        if self._watching_since is None:
            self._watching_since = self.ctx.chain.current_block()
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
        registered = {n.hotkey: n.registered_block for n in neurons}
        for hotkey in self.state.forget_reregistered(registered):
            logger.info("hotkey=%s registration changed: EMA reset", hotkey)
        if not self._observe_history(cycle):
            logger.warning("cycle=%d skipped: commit window missed and not readable from chain", cycle)
            self._record(CycleResult(cycle=cycle, eval_seed=seed, skipped=True, decision="none"))
            return
        observed = {
            h: o
            for h, o in self.state.observed.get(cycle, {}).items()
            if h in registered and (o.commit_block is None or o.commit_block >= registered[h])
        }
        rows, candidates, outage = self._downloads.verify_all(
            self.ctx, cycle, observed, uid_of, self.global_state
        )
        result = CycleResult(cycle=cycle, eval_seed=seed, global_revision=self.global_state.revision)
        if outage:
            logger.warning("cycle=%d phase=evaluate skipped: store unreachable for every submission", cycle)
            self._record(result.model_copy(update={"skipped": True, "decision": "none"}))
            return
        model = self._resident_model()
        domain_batches, general_batches = seeded_samples(self.ctx.data, config.scoring, seed)
        assert self._base_state is not None
        probe = OwnWorkProbe.build(model, self.ctx.data, config, cycle=cycle, seed=seed)
        step_norm = previous_step_norm(self.state.results.get(cycle - 1))
        ceiling = general_ceiling(  # guards what the lead publishes
            model,
            general_batches,
            base_experts=self._base_state,
            restore=self.global_state.experts,
            limit=config.scoring.general_drift_limit,
        )
        (global_domain, global_general), scores = score_submissions(
            model,
            self.global_state.experts,
            list(candidates.values()),
            domain_batches=domain_batches,
            general_batches=general_batches,
            config=config.scoring,
            max_change=max_weight_change(config.training, self.global_state.experts, factor=bound)
            if (bound := config.scoring.update_bound_factor)
            else None,
            progress=self.progress_bars,
            pool=self._eval_pool(model),
            own_work=probe,
            history=self._history,
            cycle=cycle,
            step_norm=step_norm,
        )
        remember_accepted(self.ctx, self._history, cycle, scores)
        rows.update({s.hotkey: score_row(s, rows.get(s.hotkey)) for s in scores})
        cycle_weights = rank_weights(scores, config.scoring)
        self.state.ema = update_ema(
            self.state.ema, cycle_weights, alpha=config.scoring.ema_alpha, registered=set(uid_of)
        )
        weights = chain_weights(
            self.state.ema, uid_of, burn_share=config.scoring.burn_share, owner_uid=config.scoring.owner_uid
        )
        self._downloads.keep_accepted(
            self.ctx, cycle, {s.hotkey: candidates[s.hotkey] for s in scores if s.accepted}
        )
        result = result.model_copy(
            update={
                "global_domain_loss": global_domain,
                "global_general_loss": global_general,
                "general_ceiling": ceiling,
                "step_norm": step_norm,
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

    def _observe_history(self, cycle: int) -> bool:
        if observe_window_ends(self.ctx, self.state.observed, cycle, watching_since=self._watching_since):
            self._save()
            return True
        return False

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
            block = self.ctx.chain.set_weights(weights, version_key=PROTOCOL_VERSION)
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
        candidates = self._downloads.accepted(self.ctx, cycle, result, self.global_state)
        top = [s for s in ranked(submission_scores(result)) if s.hotkey in candidates][
            : self.ctx.config.merge.top_n
        ]
        if not top:
            self._record(result.model_copy(update={"decision": "none"}))
            logger.info("cycle=%d phase=merge decision=none (no accepted submission)", cycle)
            return
        choice = choose_merge(
            result,
            top,
            candidates,
            global_state=self.global_state,
            config=self.ctx.config,
            heldout_losses=self._heldout_losses,
        )
        if choice is None:
            self._record(result.model_copy(update={"decision": "none"}))
            return
        record = merge_record(self.ctx, result, choice, global_state=self.global_state)
        new_global = GlobalState(
            cycle=cycle,
            revision=record.result_revision,
            experts=choice.experts,
            outer=choice.outer,
            record=record,
        )
        try:
            ref, block = publish_global(self.ctx, new_global)
        except (ChainError, StoreError) as exc:  # nothing adopted yet: the next block retries the same merge
            logger.warning("cycle=%d merge publication failed (retry next block): %s", cycle, exc)
            return
        if not publication_counts(self.ctx, cycle=cycle, block=block):
            return  # landed after our window: every node ignores it, so do we
        self._record_in_library(new_global, ref=ref, block=block)
        self._adopt(new_global)
        self._record(with_merge(result, record))
        logger.info(
            "cycle=%d phase=merge decision=%s inputs=%d loss=%.4f global=%.4f",
            cycle,
            choice.decision,
            len(choice.inputs),
            choice.loss,
            result.global_domain_loss or float("inf"),
        )

    def sync_global(self, cycle: int) -> None:
        """Adopt the lead's publication from before ``cycle``, after recomputing it where possible."""
        if self.global_state is None:
            self.global_state = self._genesis()
        downloads = downloads_root(self.ctx)
        pulled = pull_global(
            self.ctx, self.global_state, before=cycle, folder=lambda c: downloads / f"global-{c}"
        )
        if pulled is None:
            return
        lead, fetched = pulled
        global_state, record = self.global_state, fetched.record
        assert record is not None

        def accepted() -> dict[str, Candidate]:  # read only when the record's parent is our global
            return self._downloads.accepted(
                self.ctx, record.cycle, self.state.results.get(record.cycle), global_state
            )

        if not recompute_merge(fetched, accepted, global_state=global_state, config=self.ctx.config):
            return
        self._adopt(fetched)
        result = self.state.results.get(fetched.cycle)
        if result is not None and lead != self.ctx.hotkey:
            self._record(with_merge(result, record).model_copy(update={"decision": "adopted"}))

    def _published(self, cycle: int) -> bool:
        """True when our own valid publication for ``cycle`` is on chain (a restart after commit).

        As lead or as stand-in: a stand-in restarted mid-merge must not publish the cycle twice.
        """
        if publication_of_cycle(self.ctx.chain, self.ctx.config.cycle, cycle, hotkey=self.ctx.hotkey) is None:
            return False
        self.sync_global(cycle + 1)
        result = self.state.results[cycle]
        if (
            self.global_state is not None
            and self.global_state.cycle == cycle
            and self.global_state.record is not None
        ):
            self._record(with_merge(result, self.global_state.record))
        return True

    def _adopt(self, new_global: GlobalState) -> None:
        if self.global_state is not None and self.global_state.revision != new_global.revision:
            merged = pseudo_gradient(self.global_state.experts, new_global.experts)
            self._history.add(new_global.cycle, MERGE_SOURCE, merged)  # replaying it is a replay
        save_global_folder(self.ctx, new_global)
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
        return held_global(self.ctx, self.state, self._state_path, base)

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

    def _heldout_losses(self, experts: dict[str, torch.Tensor], seed: int) -> tuple[float, float]:
        """Mean (domain, general) loss of ``experts`` on the cycle's seeded samples; the model is restored."""
        assert self.global_state is not None
        return heldout_losses(
            self._resident_model(),
            experts,
            restore=self.global_state.experts,
            data=self.ctx.data,
            scoring=self.ctx.config.scoring,
            seed=seed,
        )

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
        state = load_state_file(self._state_path, ValidatorState)  # StateError names the file
        if state is not None:
            self.state = state
            logger.info(
                "validator resumed global_cycle=%d cycles=%s",
                self.state.global_cycle,
                sorted(self.state.results),
            )
