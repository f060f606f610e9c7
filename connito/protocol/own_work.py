"""Evidence of own work: an update must have learned its miner's assigned documents.

Each cycle every miner trains on documents assigned to its hotkey (``connito.data.assignment``),
and a control set of documents is assigned to nobody. Training on a set lowers the loss on that
set more than on unseen documents of the same domain; so a validator measures, for each
submission, the relative loss drop on the miner's assigned documents and on the control set
(both against the global experts) and pays only an update whose assigned drop exceeds the control
drop by ``scoring.own_work_margin``. A copy or a noisy copy of another miner's update, a replay of
an old one, or an update trained on the public held-out pool learned none of this miner's
documents: its assigned drop is no larger than its control drop, whatever its held-out score.

This is the before/after test of Templar's Gauntlet, applied to held-out documents a miner chose
none of. The probe also measures the drop on the assigned documents of the other submission
closest in direction, whichever committed first: an update that learned that miner's documents
at least as well as its own is a (noisy, or partly) copy of it, even when its own gap cleared the
margin by chance; the original learned its own documents far better than the copier's, so the
rule needs no commit order (a colluding sybil may commit before its source). When the update
fails, the drop on the public held-out pool (training on the evaluation data) is measured too,
so the rejection names what the update did.

May import: connito.config, connito.data, connito.ml (the scoring types only for annotations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from connito.config import DomainConfig
from connito.data import DomainData
from connito.data.sampling import sample_batches
from connito.ml.delta_sketch import DeltaSketch, cosine_estimate
from connito.ml.modeling import mean_batch_loss

if TYPE_CHECKING:
    from connito.protocol.scoring import Candidate

__all__ = ["OwnWorkProbe", "OwnWorkVerdict", "nearest_other"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnWorkVerdict:
    """What one submission's update did to its assigned, the control and the public pool documents."""

    assigned_drop: float  # relative loss drop on the miner's assigned documents
    control_drop: float  # relative loss drop on the control documents
    public_pool_drop: float | None = None  # on the public held-out pool; measured only on failure
    nearest: str | None = None  # the other submission closest in direction
    nearest_cosine: float = 0.0
    nearest_drop: float | None = None  # relative loss drop on ``nearest``'s assigned documents

    def passes(self, margin: float) -> bool:
        """The update lowered the loss on its assigned documents by ``margin`` more than on the
        control ones (hurting the control set is no evidence), and not less than on the documents
        of the submission closest to it in direction."""
        return self.assigned_drop - max(self.control_drop, 0.0) > margin and not self.learned_nearest(margin)

    def learned_nearest(self, margin: float) -> bool:
        """It learned ``nearest``'s assigned documents (by ``margin`` over control) at least as well as its own."""
        if self.nearest_drop is None:
            return False
        return (
            self.nearest_drop - max(self.control_drop, 0.0) > margin
            and self.nearest_drop >= self.assigned_drop
        )

    def reason(self, margin: float) -> tuple[str, str]:
        """The rejection code and detail of a failing verdict: what the update learned instead.

        It learned another submission's assigned documents (a near-copy of that submission),
        or the public held-out pool (training on the evaluation data), or nothing of its own.
        Whichever of the two it learned most is named: the pool when its drop beats the control,
        the own and the other submission's drops (and half the margin); the update is rejected
        either way.
        """
        own = f"its assigned documents {self.assigned_drop:.2%}, unassigned {self.control_drop:.2%}"
        public = self.public_pool_drop
        pool = f", the public held-out pool {public:.2%}" if public is not None else ""
        learned = [self.control_drop, self.assigned_drop, margin / 2]
        if self.nearest_drop is not None:
            learned.append(self.nearest_drop)
        if public is not None and public > max(learned):
            return (
                "trained_on_eval_pool",
                f"learned the public held-out pool most: loss fell on {own}{pool}",
            )
        if self.nearest_drop is not None and (
            self.learned_nearest(margin) or self.nearest_drop - self.control_drop > margin
        ):
            return (
                "near_copy",
                f"learned hotkey={self.nearest}'s assigned documents (loss fell {self.nearest_drop:.2%} there, "
                f"pseudo-gradient cosine {self.nearest_cosine:.3f}) at least as well as its own: {own}",
            )
        return (
            "not_own_work",
            f"the update did not learn its own data: loss fell on {own}{pool} (needs > {margin:.2%} more)",
        )


@dataclass
class OwnWorkProbe:
    """The cycle's control sample and each hotkey's assigned sample, with the global's losses on them.

    Built once per cycle on the model holding the global experts; ``baseline`` and ``measure``
    are called per submission (``baseline`` while the model holds the global experts).
    """

    data: DomainData
    config: DomainConfig
    cycle: int
    seed: int
    control: list[torch.Tensor]
    control_global: float
    public_pool: list[torch.Tensor]
    public_pool_global: float
    _assigned: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _baselines: dict[str, float] = field(default_factory=dict)  # hotkey -> global loss on its sample

    @classmethod
    def build(
        cls, model: nn.Module, data: DomainData, config: DomainConfig, *, cycle: int, seed: int
    ) -> OwnWorkProbe | None:
        """The probe for ``cycle``, or None when the domain assigns no data or the check is off."""
        fraction = config.training.assignment_fraction
        if fraction is None or config.scoring.own_work_margin is None:
            return None
        batches, size = config.scoring.own_work_batches, config.scoring.eval_batch_size
        control_blocks = data.control_blocks(domain=config.name, cycle=cycle, fraction=fraction)
        control = sample_batches(
            control_blocks, seed=seed, num_batches=batches, batch_size=size, salt="control"
        )
        public_pool = sample_batches(
            data.heldout_blocks, seed=seed, num_batches=batches, batch_size=size, salt="public-pool"
        )
        return cls(
            data=data,
            config=config,
            cycle=cycle,
            seed=seed,
            control=control,
            control_global=mean_batch_loss(model, control),
            public_pool=public_pool,
            public_pool_global=mean_batch_loss(model, public_pool),
        )

    @property
    def margin(self) -> float:
        assert self.config.scoring.own_work_margin is not None
        return self.config.scoring.own_work_margin

    def assigned(self, hotkey: str) -> list[torch.Tensor]:
        """The seeded sample of ``hotkey``'s assigned blocks (empty when it has no full block)."""
        if hotkey not in self._assigned:
            fraction = self.config.training.assignment_fraction
            assert fraction is not None
            blocks = self.data.assigned_blocks(
                domain=self.config.name, cycle=self.cycle, hotkey=hotkey, fraction=fraction
            )
            self._assigned[hotkey] = (
                sample_batches(
                    blocks,
                    seed=self.seed,
                    num_batches=self.config.scoring.own_work_batches,
                    batch_size=self.config.scoring.eval_batch_size,
                    salt=f"assigned:{hotkey}",
                )
                if len(blocks)
                else []
            )
        return self._assigned[hotkey]

    def baseline(self, model: nn.Module, hotkey: str) -> float:
        """The global experts' loss on ``hotkey``'s assigned sample (``model`` holds the global)."""
        if hotkey not in self._baselines:
            batches = self.assigned(hotkey)
            self._baselines[hotkey] = mean_batch_loss(model, batches) if batches else float("nan")
        return self._baselines[hotkey]

    def measure(
        self, model: nn.Module, hotkey: str, *, nearest: tuple[str, float] | None = None
    ) -> OwnWorkVerdict:
        """The verdict on the experts ``model`` holds now (the submission's).

        ``baseline`` must have been taken for ``hotkey`` and for the ``nearest`` other submission
        (its hotkey and pseudo-gradient cosine), whose assignment is always probed.
        """
        assigned = self.assigned(hotkey)
        if not assigned:  # nothing assigned: no evidence either way, so no payment either
            return OwnWorkVerdict(assigned_drop=0.0, control_drop=0.0)
        verdict = OwnWorkVerdict(
            assigned_drop=_drop(self._baselines[hotkey], mean_batch_loss(model, assigned)),
            control_drop=_drop(self.control_global, mean_batch_loss(model, self.control)),
        )
        if nearest is not None and self.assigned(nearest[0]):
            other, cosine = nearest
            learned = _drop(self._baselines[other], mean_batch_loss(model, self.assigned(other)))
            verdict = dataclasses.replace(verdict, nearest=other, nearest_cosine=cosine, nearest_drop=learned)
        if verdict.passes(self.margin):
            return verdict
        public = _drop(self.public_pool_global, mean_batch_loss(model, self.public_pool))
        return dataclasses.replace(verdict, public_pool_drop=public)


def _drop(before: float, after: float) -> float:
    """Relative loss drop; a non-finite loss is no drop (``-inf``), never evidence."""
    drop = (before - after) / before if before > 0 else float("-inf")
    return drop if drop == drop else float("-inf")


def nearest_other(kept: Sequence[tuple[Candidate, DeltaSketch]]) -> dict[str, tuple[str, float]]:
    """For each kept candidate, the other one closest in direction (either commit order), and their cosine."""
    out: dict[str, tuple[str, float]] = {}
    for index, (candidate, sketch) in enumerate(kept):
        others = [
            (cosine_estimate(sketch, other_sketch), other.hotkey)
            for position, (other, other_sketch) in enumerate(kept)
            if position != index
        ]
        if others:
            cosine, hotkey = max(others)
            out[candidate.hotkey] = (hotkey, cosine)
    return out
