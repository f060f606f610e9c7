"""Adversarial miners for the localnet: each runs the real miner loop but cheats in one way.

- ``copy``: a sybil that obtained an honest miner's checkpoint out of band and commits the same
  tensors under its own hotkey, after the honest commitment (identical payloads: the later
  commitment must lose).
- ``nan``: the global experts with a NaN written into one tensor.
- ``lazy``: the global experts re-uploaded unchanged.
- ``stale``: trains from an old global revision (the one before the latest; in the first cycle a
  perturbed copy of the base experts) and says so in its manifest.
- ``heldout``: trains honestly, but on the public held-out pool (what validators scored on before
  they had private evaluation data) instead of its assigned documents.
- ``sybil``: one of two hotkeys (``--noise`` apart) submitting the victim's update plus Gaussian
  noise of that fraction of its norm, committed after the victim.
- ``replay``: re-submits an update already paid for on this cycle's global, with no training: the
  victim's update of the last cycle (odd cycles) or the last merge's step continued (even cycles
  from 2 on); in cycle 0 there is nothing to replay and it sits out.
- ``scaled``: trains honestly on its assignment, then multiplies its update by the largest factor
  the update bound allows; writes the factor to ``scaled.json`` for the report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from connito.chain.base import Commitment
from connito.data.sampling import cycle_batches, seeded_rng
from connito.errors import CommitmentDecodeError
from connito.fsutil import atomic_write
from connito.ml.subset import SubsetModel
from connito.ml.training import SparseTrainer
from connito.ml.update_bound import max_weight_change
from connito.node.miner import Miner
from connito.protocol.checkpoint import EXPERTS_FILE, MANIFEST_FILE
from connito.protocol.commitments import CommitPayload, decode_commitment
from connito.protocol.global_state import GlobalState
from connito.protocol.merge import state_revision
from connito.protocol.step_length import at_step

logger = logging.getLogger(__name__)

__all__ = ["ADVERSARY_KINDS", "SYBIL_NOISE", "AdversaryMiner"]

ADVERSARY_KINDS = ("copy", "nan", "lazy", "stale", "heldout", "sybil", "replay", "scaled")
SYBIL_NOISE = (0.15, 0.5)  # the localnet's two sybils: noise norm / the victim's update norm
HELDOUT_STEPS = 40  # the heldout adversary's optimizer steps on the public pool


@dataclass
class AdversaryMiner(Miner):
    kind: str = "lazy"
    victim_workdir: Path | None = None
    victim_hotkey: str | None = None
    noise: float = 0.2  # sybil: noise norm as a fraction of the victim's update norm
    _previous_global: GlobalState | None = None
    _pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def pull_global(self, cycle: int) -> None:
        before = self.global_state
        super().pull_global(cycle)
        if before is not None and before.revision != (
            self.global_state.revision if self.global_state else ""
        ):
            self._previous_global = before

    def produce_experts(self, cycle: int) -> dict[str, torch.Tensor] | None:
        assert self.global_state is not None
        experts = {k: v.clone() for k, v in self.global_state.experts.items()}
        if self.kind == "lazy":
            return experts
        if self.kind == "nan":
            first = sorted(experts)[0]
            experts[first].view(-1)[0] = float("nan")
            return experts
        if self.kind == "stale":
            return self._stale(cycle)
        if self.kind == "copy":
            return self._copy(cycle)
        if self.kind == "sybil":
            return self._sybil(cycle)
        if self.kind == "replay":
            return self._replay(cycle)
        if self.kind == "scaled":
            trained = super().produce_experts(cycle)
            return self._scale(cycle, trained) if trained is not None else None
        if self.kind == "heldout":
            return self._train_on_public_pool(cycle)
        raise ValueError(f"unknown adversary kind {self.kind!r}")

    def _train_on_public_pool(self, cycle: int) -> dict[str, torch.Tensor]:
        """The miner's optimizer on the public held-out pool (what validators once scored on).

        ``HELDOUT_STEPS`` steps, not H: the localnet's two cores are shared by every trainer.
        """
        training = self.ctx.config.training
        model = self._load_global_into_model()
        selection = None if isinstance(model, SubsetModel) else self._selection()
        trainer = SparseTrainer(model, selection, training, device=self.ctx.device)
        pool = self.ctx.data.heldout_blocks  # the public pool: an adversary has no private data
        batches = cycle_batches(pool, batch_size=training.batch_size, rng=seeded_rng("pool", cycle))
        trainer.train(batches, HELDOUT_STEPS, progress=False)
        return trainer.finish()

    def _scale(self, cycle: int, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained update times the largest factor the validators' update bound lets through."""
        assert self.global_state is not None
        scoring = self.ctx.config.scoring
        moved = max(
            float((self.global_state.experts[k].float() - v.float()).abs().max()) for k, v in trained.items()
        )
        bound = max_weight_change(
            self.ctx.config.training, self.global_state.experts, factor=scoring.update_bound_factor or 2.0
        )
        factor = 0.98 * bound / moved if moved > 0 else 1.0
        atomic_write(
            self.ctx.workdir / "scaled" / f"{cycle}.json",
            json.dumps({"cycle": cycle, "factor": factor}).encode(),
        )
        logger.info("cycle=%d scaled update by %.3f (bound %.3g, moved %.3g)", cycle, factor, bound, moved)
        return at_step(self.global_state.experts, trained, factor)

    def _victim_experts(self, cycle: int) -> dict[str, torch.Tensor] | None:
        if self.victim_workdir is None:
            raise ValueError(f"{self.kind} adversary needs victim_workdir")
        source = self.victim_workdir / "checkpoints" / str(cycle) / EXPERTS_FILE
        return load_file(str(source)) if source.exists() else None

    def _sybil(self, cycle: int) -> dict[str, torch.Tensor] | None:
        """The victim's update plus noise of ``noise`` x its norm (a fresh draw per hotkey and cycle)."""
        assert self.global_state is not None
        victim = self._victim_experts(cycle)
        if victim is None:
            return None
        glob = self.global_state.experts
        norm = _norm({k: glob[k].float() - victim[k].float() for k in glob})
        generator = torch.Generator().manual_seed(int(self.ctx.hotkey.encode().hex()[:12], 16) + cycle)
        noise = {k: torch.randn(v.shape, generator=generator) for k, v in glob.items()}
        unit = self.noise * norm / _norm(noise)
        return {k: (victim[k].float() + unit * noise[k]).to(glob[k].dtype) for k in glob}

    def _replay(self, cycle: int) -> dict[str, torch.Tensor] | None:
        """An update already paid for, applied to this cycle's global: no training at all."""
        assert self.global_state is not None
        glob, before = self.global_state.experts, self._previous_global
        if cycle >= 2 and cycle % 2 == 0 and before is not None:
            step = {k: before.experts[k].float() - glob[k].float() for k in glob}  # last merge, continued
        else:
            old = self._victim_experts(cycle - 1) if cycle >= 1 else None
            trained_from = self._global_of(self._victim_revision(cycle - 1))
            if old is None or trained_from is None:
                return None  # nothing accepted yet to replay
            step = {k: trained_from[k].float() - old[k].float() for k in glob}
        return {k: (glob[k].float() - step[k]).to(glob[k].dtype) for k in glob}

    def _victim_revision(self, cycle: int) -> str | None:
        """The global revision the victim's checkpoint of ``cycle`` says it trained from."""
        assert self.victim_workdir is not None
        path = self.victim_workdir / "checkpoints" / str(cycle) / MANIFEST_FILE
        return json.loads(path.read_text()).get("global_revision") if path.exists() else None

    def _global_of(self, revision: str | None) -> dict[str, torch.Tensor] | None:
        for known in (self.global_state, self._previous_global):
            if known is not None and known.revision == revision:
                return known.experts
        return None

    def _stale(self, cycle: int) -> dict[str, torch.Tensor]:
        assert self.global_state is not None
        if self._previous_global is not None and self._previous_global.revision != self.global_state.revision:
            old = {k: v.clone() for k, v in self._previous_global.experts.items()}
        else:
            generator = torch.Generator().manual_seed(cycle)
            old = {
                k: v + 1e-3 * torch.randn(v.shape, generator=generator).to(v.dtype)
                for k, v in self.global_state.experts.items()
            }
        self.progress = self.progress.model_copy(update={"global_revision": state_revision(old)})
        # a little real training on the old experts, so the submission is not merely lazy
        for key, tensor in old.items():
            generator = torch.Generator().manual_seed(hash(key) % 2**31)
            tensor.add_(1e-3 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        return old

    def _copy(self, cycle: int) -> dict[str, torch.Tensor] | None:
        return self._victim_experts(cycle)  # None: the victim has not finished yet, try next block

    def commit(self, cycle: int) -> None:
        if self.kind in ("copy", "sybil") and not self._victim_committed_before_now(cycle):
            return
        super().commit(cycle)

    def _victim_committed_before_now(self, cycle: int) -> bool:
        block = self.ctx.chain.current_block()
        for commitment in self.ctx.chain.commitments():
            if commitment.hotkey == self.victim_hotkey and _is_commit(commitment, cycle):
                return commitment.block < block
        return False


def _is_commit(commitment: Commitment, cycle: int) -> bool:
    try:
        payload = decode_commitment(commitment.data)
    except CommitmentDecodeError:
        return False
    return isinstance(payload, CommitPayload) and payload.cycle == cycle


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.float() ** 2).sum()) for t in tensors.values()))
