"""The miner: each cycle pull the global experts, train them on its shard, commit, then reveal.

One method per phase. The digest is committed inside the commit phase; the checkpoint is uploaded
and its location revealed only after the commit deadline, so nothing is public while others can
still commit. Progress is persisted atomically, so a restart within a cycle resumes training and
never commits twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from connito.errors import ChainError, ConfigError, StoreError
from connito.fsutil import atomic_write, sweep_temp_files
from connito.hub.base import StoreRef
from connito.ml.distributed import Distributed, broadcast_object, main_decides
from connito.ml.modeling import load_model
from connito.ml.moe import moe_layers, parse_expert_key, read_experts, write_expert, write_experts
from connito.ml.subset import SubsetModel, subset_expert_state
from connito.ml.subset_loading import load_subset_model
from connito.ml.training import SparseTrainer
from connito.ml.update_bound import moments_may_carry
from connito.node.context import NodeContext, node_loop, uid_of
from connito.node.disk_retention import Retention
from connito.node.global_sync import pull_global
from connito.node.startup_checks import load_state_file
from connito.protocol.checkpoint import MANIFEST_FILE, write_checkpoint
from connito.protocol.commitments import (
    CommitPayload,
    RevealPayload,
    StoreKind,
    commit_digest,
    encode_commitment,
    short_digest,
)
from connito.protocol.global_state import GlobalState, genesis_global
from connito.protocol.phases import PhaseInfo, phase_bounds

logger = logging.getLogger(__name__)

__all__ = ["Miner", "MinerProgress"]

SAVE_EVERY_STEPS = 10


class MinerProgress(BaseModel):
    """What this miner has done in its current cycle (persisted atomically)."""

    model_config = ConfigDict(extra="forbid")

    cycle: int = -1
    global_revision: str = ""
    checkpoint: str | None = None  # folder of the finished checkpoint
    tensors_sha256: str | None = None
    commit_block: int | None = None
    uploaded: StoreRef | None = (
        None  # where the reveal's upload landed: a retried reveal re-sends only the chain write
    )
    reveal_block: int | None = None


@dataclass
class Miner:
    """A miner bound to one hotkey; ``run`` drives it from the chain's blocks."""

    ctx: NodeContext
    poll_s: float = 1.0
    progress_bars: bool = True
    global_state: GlobalState | None = None
    progress: MinerProgress = field(default_factory=MinerProgress)
    dist: Distributed = field(default_factory=Distributed.single)  # rank 0 alone writes, commits, reveals
    _model: torch.nn.Module | SubsetModel | None = None
    _retention: Retention = field(init=False)

    @property
    def _progress_path(self) -> Path:
        return self.ctx.workdir / "miner_progress.json"

    def __post_init__(self) -> None:
        """Resume from the workdir: a restart within a cycle never trains or commits twice."""
        self._retention = Retention(self.ctx)
        if self.dist.is_main:  # the other ranks write nothing there
            sweep_temp_files(self.ctx.workdir)  # what a kill -9 left half-written
        progress = load_state_file(self._progress_path, MinerProgress)  # StateError names the file
        if progress is not None:
            self.progress = progress
            logger.info(
                "miner resumed cycle=%d committed=%s", self.progress.cycle, self.progress.commit_block
            )

    def run(self, *, until_cycle: int | None = None) -> int:
        loop = node_loop(self.ctx, role="miner", poll_s=self.poll_s)  # checks the protocol version
        return loop.run(self.tick, until_cycle=until_cycle)

    def tick(self, block: int, info: PhaseInfo) -> None:
        if self.dist.is_main:  # keep the last ctx.keep_cycles cycles of files on disk
            held = self.global_state.cycle if self.global_state is not None else -1
            self._retention.at_cycle(info.cycle, global_cycle=held)
        if info.phase == "train":
            self.train(info.cycle)
        elif info.phase == "commit":
            if self.progress.cycle != info.cycle or self.progress.checkpoint is None:
                self.train(info.cycle)  # late start: still worth it if it ends before the deadline
            self.commit(info.cycle)
        elif info.phase == "reveal":
            self.reveal(info.cycle)

    # -- phases ------------------------------------------------------------------------------

    def train(self, cycle: int) -> None:
        """Pull the global experts, train H inner steps on this miner's shard, write the checkpoint."""
        if self.progress.cycle == cycle and self.progress.checkpoint is not None:
            return
        self.pull_global(cycle)
        assert self.global_state is not None
        if self.progress.cycle != cycle:
            self._save_progress(MinerProgress(cycle=cycle, global_revision=self.global_state.revision))
        experts = self.produce_experts(cycle)
        if experts is None:
            return
        self.write_submission(cycle, experts)

    def pull_global(self, cycle: int) -> None:
        """Adopt the lead's publication from the previous cycle's merge phase, if it is newer."""
        if self.global_state is None:
            self.global_state = genesis_global(self._base_experts())
        if not self.dist.is_main:
            return  # rank 0's global reaches the other ranks through the trainer's broadcast
        global_folder = self.ctx.workdir / "global"
        pulled = pull_global(
            self.ctx, self.global_state, before=cycle, folder=lambda c: global_folder / str(c)
        )
        if pulled is not None:
            self.global_state = pulled[1]

    def produce_experts(self, cycle: int) -> dict[str, torch.Tensor] | None:
        """Train the selected experts from the global state; None when out of time."""
        assert self.global_state is not None
        cfg = self.ctx.config
        neurons = (
            self.ctx.chain.metagraph()
        )  # chain reads before the first collective: a retry re-enters there
        uid = uid_of(neurons, self.ctx.hotkey)
        if uid is None:
            raise ChainError(f"hotkey {self.ctx.hotkey} is not registered")
        uid, shards = broadcast_object((uid, len(neurons)), self.dist)  # every rank reads rank 0's shard
        model = self._load_global_into_model()
        trainer = SparseTrainer(
            model,
            None if isinstance(model, SubsetModel) else self._selection(),
            cfg.training,
            device=self.ctx.device,
            dist=self.dist,
        )
        self._resume(trainer, cycle)
        start_step = trainer.sync_replicas()  # every rank continues from rank 0's state
        loader = self._train_loader(cycle, uid, shards)
        for _ in range(start_step * trainer.micro_batches_per_step):
            next(loader)
        remaining = cfg.training.inner_steps - start_step
        deadline = self._training_deadline(cycle)
        while remaining > 0:
            chunk = min(SAVE_EVERY_STEPS, remaining)
            start_block = self._block()
            result = trainer.train(loader, chunk, progress=self.progress_bars)
            self.ctx.metrics.observe_training(result)
            remaining -= chunk
            self._save_trainer(trainer, cycle)
            logger.debug("cycle=%d trained steps=%d loss=%.4f", cycle, trainer.step_count, result.mean_loss)
            now = self._block()
            if remaining > 0 and main_decides(now + max(1, now - start_block) > deadline, self.dist):
                logger.warning(
                    "cycle=%d stopping early at step=%d of %d to make the commit window (block=%d deadline=%d)",
                    cycle, trainer.step_count, cfg.training.inner_steps, now, deadline,
                )  # fmt: skip
                break
        experts = trainer.finish()
        if self.dist.shards_model:
            self._model = None  # fsdp sharded it in place: the next cycle loads a fresh one
        logger.info("trained cycle=%d steps=%d", cycle, trainer.step_count)
        return experts

    def _train_loader(self, cycle: int, uid: int, shards: int) -> Iterator[torch.Tensor]:
        """This cycle's assigned documents (the own-work evidence), or the uid's fixed shard."""
        cfg = self.ctx.config
        if cfg.training.assignment_fraction is None:
            return self.ctx.data.train_loader(uid, shards, cfg.training.batch_size, seed=self._seed(cycle))
        return self.ctx.data.assigned_loader(
            domain=cfg.name,
            cycle=cycle,
            hotkey=self.ctx.hotkey,
            fraction=cfg.training.assignment_fraction,
            batch_size=cfg.training.batch_size,
            seed=self._seed(cycle),
        )

    def _training_deadline(self, cycle: int) -> int:
        """The last block at which training may end and still leave time to commit."""
        first, last = phase_bounds(cycle, "commit", self.ctx.config.cycle)
        return last - max(1, (last - first + 1) // 2)

    def _block(self) -> int:
        """The current block; on a chain outage, a block far in the past (keep training)."""
        try:
            return self.ctx.chain.current_block()
        except ChainError:
            return -1

    def write_submission(self, cycle: int, experts: dict[str, torch.Tensor]) -> None:
        assert self.global_state is not None
        folder = self.ctx.workdir / "checkpoints" / str(cycle)
        if not self.dist.is_main:
            self.progress = self.progress.model_copy(update={"checkpoint": str(folder)})
            return
        manifest = write_checkpoint(
            folder,
            experts,
            kind="submission",
            domain=self.ctx.config.name,
            model_id=self.ctx.selection.model_id,
            model_revision=self.ctx.selection.model_revision,
            selection_digest=self.ctx.selection.digest,
            cycle=cycle,
            global_revision=self.progress.global_revision,
            hotkey=self.ctx.hotkey,
            # an int8 delta is only meaningful against the global the manifest names
            encoding=self.ctx.config.training.payload
            if self.global_state.revision == self.progress.global_revision
            else "fp",
            base=self.global_state.experts,
        )
        self._save_progress(
            self.progress.model_copy(
                update={"checkpoint": str(folder), "tensors_sha256": manifest.tensors_sha256}
            )
        )

    def commit(self, cycle: int) -> None:
        """Commit the digest binding (domain, cycle, global revision, hotkey, tensors) once."""
        if not self.dist.is_main:
            return
        progress = self.progress
        if progress.cycle != cycle or progress.checkpoint is None or progress.commit_block is not None:
            return
        digest = commit_digest(
            domain=self.ctx.config.name,
            cycle=cycle,
            global_revision=progress.global_revision,
            hotkey=self.ctx.hotkey,
            tensors_sha256=progress.tensors_sha256 or "",
        )
        try:
            block = self.ctx.chain.commit(encode_commitment(CommitPayload(cycle=cycle, digest=digest)))
        except ChainError as exc:
            logger.warning("commit failed cycle=%d: %s", cycle, exc)
            self.ctx.metrics.miner_stage("commit", ok=False)
            return
        self.ctx.metrics.miner_stage("commit", ok=True)
        self._save_progress(progress.model_copy(update={"commit_block": block}))
        logger.info("committed cycle=%d block=%d digest=%s", cycle, block, digest.hex()[:12])

    def reveal(self, cycle: int) -> None:
        """After the commit deadline: upload the checkpoint and commit where it is."""
        if not self.dist.is_main:
            return
        progress = self.progress
        if progress.cycle != cycle or progress.commit_block is None or progress.reveal_block is not None:
            return
        folder = Path(progress.checkpoint or "")
        try:
            ref = progress.uploaded or self._upload_once(cycle, folder)
            manifest_sha = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).digest()
            payload = RevealPayload(
                cycle=cycle,
                store_kind=cast(StoreKind, ref.kind),  # the payload model validates it
                repo=ref.repo,
                revision=ref.revision,
                manifest_digest=short_digest(manifest_sha),
            )
            block = self.ctx.chain.commit(encode_commitment(payload))
        except (StoreError, ChainError) as exc:
            logger.warning("reveal failed cycle=%d: %s", cycle, exc)
            self.ctx.metrics.miner_stage("reveal", ok=False)
            return
        self.ctx.metrics.miner_stage("reveal", ok=True)
        self._save_progress(progress.model_copy(update={"reveal_block": block}))
        logger.info("revealed cycle=%d block=%d repo=%s rev=%s", cycle, block, ref.repo, ref.revision[:12])

    def _upload_once(self, cycle: int, folder: Path) -> StoreRef:
        """Upload the checkpoint and persist where it landed, so the cycle uploads it once."""
        ref = self.ctx.store.upload(folder, repo=self.ctx.hub_repo, message=f"cycle {cycle}")
        self._save_progress(self.progress.model_copy(update={"uploaded": ref}))
        return ref

    # -- helpers -----------------------------------------------------------------------------

    def _selection(self) -> dict[int, list[int]]:
        return self.ctx.selection.experts_by_layer

    def _base_experts(self) -> dict[str, torch.Tensor]:
        model = self._model_or_load()
        if isinstance(model, SubsetModel):
            return subset_expert_state(model)
        return read_experts(model, self._selection())

    def _model_or_load(self) -> torch.nn.Module | SubsetModel:
        if self._model is None:
            cfg = self.ctx.config
            device = torch.device("cpu") if self.dist.shards_model else self.ctx.device  # fsdp moves shards
            if cfg.training.residency == "subset":
                self._model = load_subset_model(
                    self.ctx.base_dir, cfg.model, self._selection(), device=device
                )
            else:
                self._model = load_model(self.ctx.base_dir, cfg.model).to(device)
        return self._model

    def _load_global_into_model(self) -> torch.nn.Module | SubsetModel:
        assert self.global_state is not None
        model = self._model_or_load()
        if isinstance(model, SubsetModel):
            write_subset_experts(model, self.global_state.experts)
        else:
            write_experts(model, self.global_state.experts)
        return model

    def _seed(self, cycle: int) -> int:
        digest = hashlib.sha256(
            f"{self.ctx.hotkey}:{cycle}:{self.ctx.config.training.seed}".encode()
        ).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def _trainer_path(self) -> Path:
        return self.ctx.workdir / "trainer_state.safetensors"

    def _save_trainer(self, trainer: SparseTrainer, cycle: int) -> None:
        if not self.dist.is_main:
            return
        tensors = {k: v.contiguous() for k, v in trainer.state_dict().items()}
        metadata = {"cycle": str(cycle), "global_revision": self.progress.global_revision}
        tmp = self._trainer_path().with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        atomic_write(self._trainer_path(), tmp.read_bytes())
        tmp.unlink(missing_ok=True)

    def _resume(self, trainer: SparseTrainer, cycle: int) -> int:
        path = self._trainer_path()
        if not path.exists():
            return 0
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if (
            metadata.get("cycle") != str(cycle)
            or metadata.get("global_revision") != self.progress.global_revision
        ):
            self._carry_moments(trainer, path, metadata, cycle)
            return 0
        try:
            trainer.load_state_dict(load_file(str(path)))
        except ConfigError as exc:
            logger.warning("trainer state not resumable: %s", exc)
            return 0
        logger.info("resumed training cycle=%d step=%d", cycle, trainer.step_count)
        return trainer.step_count

    def _carry_moments(
        self, trainer: SparseTrainer, path: Path, metadata: dict[str, str], cycle: int
    ) -> None:
        """Start this cycle with the AdamW moments an earlier cycle ended with (DiLoCo's inner state)."""
        if not moments_may_carry(self.ctx.config.training):
            return
        earlier = metadata.get("cycle", "")
        if not earlier.isdigit() or int(earlier) >= cycle:
            return
        if trainer.load_optimizer_moments(load_file(str(path))):
            logger.info("carried optimizer moments cycle=%d from_cycle=%s", cycle, earlier)

    def _save_progress(self, progress: MinerProgress) -> None:
        self.progress = progress
        if self.dist.is_main:  # the other ranks follow rank 0 in memory
            atomic_write(self._progress_path, progress.model_dump_json(indent=2).encode())


def write_subset_experts(subset: SubsetModel, experts: dict[str, torch.Tensor]) -> None:
    """Write canonical-key experts (original ids) into the subset model's slots."""
    layers = {layer.index: layer for layer in moe_layers(subset.model)}
    grouped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in experts.items():
        layer, expert, projection = parse_expert_key(key)
        grouped.setdefault((layer, subset.slot_of(layer, expert)), {})[projection] = tensor
    for (layer, slot), tensors in grouped.items():
        write_expert(layers[layer], slot, tensors)
