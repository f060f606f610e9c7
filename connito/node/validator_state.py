"""What a validator persists: each cycle's scores and decisions, and the state a restart resumes from.

Plain pydantic models, apart from the neuron, so that reports and metrics can read a validator's
state without loading a model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from connito.protocol.scoring import SubmissionScore
from connito.protocol.submissions import Observation

__all__ = ["CycleResult", "ScoreRow", "ValidatorState", "score_row", "submission_scores"]


class ScoreRow(BaseModel):
    """One submission's verification and score in one cycle."""

    model_config = ConfigDict(extra="forbid")

    hotkey: str
    uid: int
    accepted: bool
    reason: str | None = None
    detail: str = ""
    domain_loss: float | None = None
    general_loss: float | None = None
    utility: float = 0.0
    update_norm: float | None = None  # |pseudo-gradient| as sent
    scored_norm: float | None = None  # the step length its losses were measured at
    assigned_drop: float | None = None  # own-work evidence: relative loss drop on its assigned documents
    control_drop: float | None = None  # ... and on the cycle's control documents
    commit_block: int = 0
    tensors_sha256: str | None = None
    repo: str | None = None
    revision: str | None = None
    store_kind: str | None = None


class CycleResult(BaseModel):
    """One cycle's evaluation and merge, as this validator saw them (persisted, read by reports)."""

    model_config = ConfigDict(extra="forbid")

    cycle: int
    skipped: bool = False
    eval_seed: int = 0
    global_revision: str = ""
    global_domain_loss: float | None = None
    global_general_loss: float | None = None
    scores: list[ScoreRow] = Field(default_factory=list)
    cycle_weights: dict[str, float] = Field(default_factory=dict)
    weights: dict[int, float] = Field(default_factory=dict)
    weights_set_block: int | None = None
    decision: str = "pending"  # pending | merged | best_single | none | adopted
    merged: list[str] = Field(default_factory=list)
    result_revision: str | None = None
    result_domain_loss: float | None = None
    general_ceiling: float | None = None  # the base's general loss x (1 + general_drift_limit)
    step_norm: float | None = None  # the step length fixed by the last cycle (None: this cycle's)


class ValidatorState(BaseModel):
    """Everything that must survive a restart."""

    model_config = ConfigDict(extra="forbid")

    observed: dict[int, dict[str, Observation]] = Field(default_factory=dict)
    results: dict[int, CycleResult] = Field(default_factory=dict)
    ema: dict[str, float] = Field(default_factory=dict)
    registered_at: dict[str, int] = Field(default_factory=dict)  # registration block behind each EMA
    global_cycle: int = -1  # cycle of the adopted global state (-1: genesis)

    def forget_reregistered(self, registered: dict[str, int]) -> list[str]:
        """Reset the EMA of each hotkey registered anew since it was earned; returns those hotkeys.

        ``registered`` maps each registered hotkey to its registration block. Deregistration
        frees the uid, so a returning hotkey is a new participant: carrying its old EMA would pay
        it for a previous life. (Unregistered hotkeys are dropped by ``update_ema``; an EMA with no
        recorded registration, from an older state file, is kept.)
        """
        known = self.registered_at
        stale = [h for h in self.ema if h in known and h in registered and known[h] != registered[h]]
        for hotkey in stale:
            del self.ema[hotkey]
        self.registered_at = dict(registered)
        return stale


def score_row(score: SubmissionScore, pre: ScoreRow | None) -> ScoreRow:
    """``score`` as a persisted row, keeping what verification recorded in ``pre`` (store, revision)."""
    base = pre.model_dump() if pre else {"hotkey": score.hotkey, "uid": score.uid}
    base.update(
        accepted=score.accepted,
        reason=score.reason,
        detail=score.detail,
        domain_loss=score.domain_loss,
        general_loss=score.general_loss,
        utility=score.utility,
        update_norm=score.update_norm,
        scored_norm=score.scored_norm,
        assigned_drop=score.assigned_drop,
        control_drop=score.control_drop,
        commit_block=score.commit_block,
    )
    return ScoreRow(**base)


def submission_scores(result: CycleResult) -> list[SubmissionScore]:
    """A cycle's persisted rows back as scores (weights and merges are computed from scores)."""
    return [
        SubmissionScore(
            hotkey=r.hotkey,
            uid=r.uid,
            commit_block=r.commit_block,
            accepted=r.accepted,
            reason=r.reason,
            domain_loss=r.domain_loss,
            general_loss=r.general_loss,
            utility=r.utility,
        )
        for r in result.scores
    ]
