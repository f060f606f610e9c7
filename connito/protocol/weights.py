"""From scores to weights: rank the accepted submissions, weight the top-k, blend into the EMA.

Every validator applies the same pure functions to its scores, so validators that measured the
same order set the same weights.

May import: connito.config and connito.protocol.scoring's score type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from connito.config import ScoringConfig
from connito.protocol.scoring import SubmissionScore

__all__ = ["ranked", "rank_weights", "update_ema", "chain_weights", "weight_cosine"]


def ranked(scores: Sequence[SubmissionScore]) -> list[SubmissionScore]:
    """Accepted submissions, best first: lower loss, then earlier commitment, then hotkey.

    A non-finite loss is never ranked: NaN compares false both ways, so it would make the order
    depend on the input order and differ between validators.
    """
    accepted = [
        s for s in scores if s.accepted and s.domain_loss is not None and math.isfinite(s.domain_loss)
    ]
    return sorted(accepted, key=lambda s: (s.domain_loss, s.commit_block, s.hotkey))


def rank_weights(scores: Sequence[SubmissionScore], config: ScoringConfig) -> dict[str, float]:
    """This cycle's weight per hotkey from rank: positive for the top-k accepted, summing to 1."""
    top = ranked(scores)[: config.top_k]
    if not top:
        return {}
    if config.rank_weighting == "winner_take_all":
        raw = [1.0] + [0.0] * (len(top) - 1)
    elif config.rank_weighting == "linear":
        raw = [float(len(top) - rank) for rank in range(len(top))]
    else:
        raw = [config.rank_decay**rank for rank in range(len(top))]
    total = sum(raw)
    return {score.hotkey: value / total for score, value in zip(top, raw, strict=True) if value > 0}


def update_ema(
    ema: dict[str, float], cycle_weights: dict[str, float], *, alpha: float, registered: set[str]
) -> dict[str, float]:
    """Blend this cycle into the running weights; hotkeys no longer registered are forgotten."""
    hotkeys = (set(ema) | set(cycle_weights)) & registered
    blended = {h: alpha * cycle_weights.get(h, 0.0) + (1 - alpha) * ema.get(h, 0.0) for h in sorted(hotkeys)}
    return {h: w for h, w in blended.items() if w > 1e-12}


def chain_weights(
    ema: dict[str, float], uid_of: dict[str, int], *, burn_share: float, owner_uid: int | None
) -> dict[int, float]:
    """Weights over uids to set on chain: the EMA normalised, with an optional burn share to the owner."""
    weights = {uid_of[h]: w for h, w in ema.items() if h in uid_of and math.isfinite(w) and w > 0}
    total = sum(weights.values())
    if total <= 0:
        return {owner_uid: 1.0} if owner_uid is not None and burn_share > 0 else {}
    weights = {uid: (1 - burn_share) * w / total for uid, w in weights.items()}
    if burn_share > 0 and owner_uid is not None:
        weights[owner_uid] = weights.get(owner_uid, 0.0) + burn_share
    return weights


def weight_cosine(a: dict[int, float], b: dict[int, float]) -> float:
    """Cosine of two validators' weight vectors over uids (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    dot = sum(a.get(uid, 0.0) * b.get(uid, 0.0) for uid in set(a) | set(b))
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm > 0 else 0.0
