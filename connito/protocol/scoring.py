"""Proof-of-Loss: score every submission on the same seeded held-out sample as the global model.

utility = max(0, L_global - L_submission). The validator's model holds the global experts; each
submission's experts are swapped in place (never a model reload), evaluated, and swapped back, so
the model is bit-identical afterwards. A submission is rejected whole, with a recorded reason,
when it is a duplicate (identical tensors, or a pseudo-gradient cosine at or above the threshold:
the later commitment loses), lazy (zero delta, or no improvement), non-finite on any batch (never
drop a batch: that is how miners hide their hard batches), or worse on general text than the
global model by more than the tolerance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from connito.config import ScoringConfig
from connito.ml.delta_sketch import DeltaSketch, cosine_upper_bound, sketch_delta
from connito.ml.eval_pool import EvalPool
from connito.ml.modeling import token_loss
from connito.ml.moe import write_experts

logger = logging.getLogger(__name__)

__all__ = [
    "LOSS_RESOLUTION",
    "Candidate",
    "SubmissionScore",
    "batch_losses",
    "pseudo_gradient",
    "cosine_similarity",
    "score_submissions",
    "ranked",
    "rank_weights",
    "update_ema",
    "chain_weights",
]

# Smallest loss drop, as a share of the global loss, that counts as an improvement. Each batch
# loss is an fp32 sum over thousands of tokens, rounded to ~sqrt(tokens) * 2**-24 of its size
# (5e-6 at 2,048 tokens): below this a difference is rounding, or the first-order accident of a
# random direction, not learning. Without it, random noise of small norm on the global experts
# (a lazy miner dodging the zero-delta check) measures "better" about half the time and earns
# rank weight. ``ScoringConfig.min_improvement`` can only raise the bar.
LOSS_RESOLUTION = 1e-5

# How far below the duplicate threshold a sketch's cosine bound must be for the screen to skip the
# exact fp32 cosine. The bound is on the real cosine; the margin covers the rounding of the fp32
# one (about 1e-6 on a sum of 10^6 products), so skipping never changes a decision unless that
# rounding is 10^4 times larger, and then the decision follows the real cosine.
SKETCH_MARGIN = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A verified submission: its experts passed the strict loader and match the commitment.

    The experts are held in ``state``, or read again on demand by ``load`` (a validator keeps
    them in its verified download folder, so its memory does not grow with the submission count).
    """

    hotkey: str
    uid: int
    commit_block: int
    tensors_sha256: str
    state: dict[str, torch.Tensor] | None = None  # canonical expert key -> tensor
    load: Callable[[], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if (self.state is None) == (self.load is None):
            raise ValueError(f"candidate hotkey={self.hotkey}: give exactly one of state and load")

    def experts(self) -> dict[str, torch.Tensor]:
        """The submission's expert tensors (read again from disk each call when held by ``load``)."""
        return self.state if self.state is not None else self.load()  # type: ignore[misc]


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmissionScore:
    """The outcome for one submission in one cycle."""

    hotkey: str
    uid: int
    commit_block: int
    accepted: bool
    reason: str | None = None  # rejection code; None when accepted
    detail: str = ""
    domain_loss: float | None = None
    general_loss: float | None = None
    utility: float = 0.0


def batch_losses(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[float]:
    """Mean token cross-entropy of each batch (eval mode, no grad), in batch order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for batch in batches:
            loss_sum, count = token_loss(model, batch.to(device))
            losses.append(loss_sum / max(count, 1))
    model.train(was_training)
    return losses


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def pseudo_gradient(global_state: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> torch.Tensor:
    """global - local over every key, flattened in key order, in fp32 (DiLoCo's outer gradient)."""
    return torch.cat([(global_state[k].float() - local[k].float()).reshape(-1) for k in sorted(global_state)])


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors; 0 when either is zero."""
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _reject(
    candidate: Candidate,
    reason: str,
    detail: str,
    *,
    domain_loss: float | None = None,
    general_loss: float | None = None,
) -> SubmissionScore:
    logger.warning(
        "rejected hotkey=%s uid=%d reason=%s detail=%s", candidate.hotkey, candidate.uid, reason, detail
    )
    return SubmissionScore(
        hotkey=candidate.hotkey,
        uid=candidate.uid,
        commit_block=candidate.commit_block,
        accepted=False,
        reason=reason,
        detail=detail,
        domain_loss=domain_loss,
        general_loss=general_loss,
    )


def _screen_copies(
    candidates: Sequence[Candidate],
    global_state: dict[str, torch.Tensor],
    cosine_threshold: float,
    max_change: float | None,
) -> tuple[list[tuple[Candidate, DeltaSketch]], list[SubmissionScore]]:
    """Drop lazy, oversized and copied submissions before any evaluation; earliest commitment wins ties.

    ``max_change`` bounds how far any weight may have moved (``connito.ml.update_bound``): a larger
    move is a rescaled or foreign update, never merged or published, however good its loss.

    Candidates are visited in ``(commit_block, hotkey)`` order, so copies committed in the same
    block go to the lexically smaller hotkey on every validator, whatever the arrival order.
    A kept pseudo-gradient is held only as its int8 sketch (a quarter of an fp32 delta); see
    ``_find_twin``.
    """
    kept: list[tuple[Candidate, DeltaSketch]] = []
    rejected: list[SubmissionScore] = []
    seen_digests: dict[str, str] = {}
    for candidate in sorted(candidates, key=lambda c: (c.commit_block, c.hotkey)):
        if candidate.tensors_sha256 in seen_digests:
            original = seen_digests[candidate.tensors_sha256]
            rejected.append(_reject(candidate, "duplicate", f"identical tensors to hotkey={original}"))
            continue
        seen_digests[candidate.tensors_sha256] = candidate.hotkey
        delta = pseudo_gradient(global_state, candidate.experts())
        if not torch.isfinite(delta).all():
            rejected.append(_reject(candidate, "non_finite", "non-finite expert weights"))
            continue
        moved = float(delta.abs().max())
        if moved == 0.0:
            rejected.append(_reject(candidate, "lazy", "zero delta: the global experts unchanged"))
            continue
        if max_change is not None and moved > max_change:
            detail = (
                f"an expert weight moved {moved:.3g} > {max_change:.3g}, the most H inner steps can move it"
            )
            rejected.append(_reject(candidate, "update_too_large", detail))
            continue
        sketch = sketch_delta(delta)
        twin = _find_twin(delta, sketch, kept, global_state, cosine_threshold)
        if twin is not None:
            rejected.append(
                _reject(
                    candidate,
                    "duplicate",
                    f"pseudo-gradient cosine >= {cosine_threshold} with hotkey={twin.hotkey}",
                )
            )
            continue
        kept.append((candidate, sketch))
    return kept, rejected


def _find_twin(
    delta: torch.Tensor,
    sketch: DeltaSketch,
    kept: Sequence[tuple[Candidate, DeltaSketch]],
    global_state: dict[str, torch.Tensor],
    cosine_threshold: float,
) -> Candidate | None:
    """The first kept candidate whose pseudo-gradient cosine with ``delta`` reaches the threshold.

    Sketches bound each cosine from above; a pair the bound cannot clear gets the exact fp32
    cosine of the full vectors (the kept one's delta recomputed from its experts), so the answer
    is that of comparing every pair exactly, and near-copies are the only pairs re-read.
    """
    for other, other_sketch in kept:
        if cosine_upper_bound(sketch, other_sketch) < cosine_threshold - SKETCH_MARGIN:
            continue
        other_delta = pseudo_gradient(global_state, other.experts())
        if cosine_similarity(delta, other_delta) >= cosine_threshold:
            return other
    return None


def score_submissions(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    candidates: Sequence[Candidate],
    *,
    domain_batches: Sequence[torch.Tensor],
    general_batches: Sequence[torch.Tensor],
    config: ScoringConfig,
    max_change: float | None = None,
    progress: bool = False,
    pool: EvalPool | None = None,
) -> tuple[tuple[float, float], list[SubmissionScore]]:
    """Score every candidate against the global experts that ``model`` holds on entry.

    Returns ``((global_domain_loss, global_general_loss), scores)`` with one score per candidate.
    ``model`` holds exactly the global experts again on return, whatever happened. ``progress``
    shows a bar over the candidates (evaluation is the validator's longest step). ``max_change``
    is the largest allowed ``|local - global|`` of any weight (None: unbounded). ``pool`` spreads
    the candidates over its replicas (one device each; ``model`` may be one of them), with the
    same scores as on ``model`` alone; each replica holds the global experts again on return.
    """
    global_domain = _mean(batch_losses(model, domain_batches))
    global_general = _mean(batch_losses(model, general_batches)) if general_batches else float("nan")
    kept, scores = _screen_copies(candidates, global_state, config.duplicate_cosine, max_change)

    def evaluate(replica: nn.Module, candidate: Candidate) -> SubmissionScore:
        experts = candidate.experts()  # read here, one candidate per replica in memory at a time
        try:
            write_experts(replica, experts)
            return _evaluate_one(
                replica,
                candidate,
                domain_batches,
                general_batches,
                global_domain,
                global_general,
                config,
            )
        finally:
            write_experts(replica, global_state)

    queue = [candidate for candidate, _sketch in kept]
    if pool is None:
        scores += [
            evaluate(model, c) for c in tqdm(queue, desc="evaluate", unit="submission", disable=not progress)
        ]
    else:
        scores += pool.map(evaluate, queue, progress=progress)
    order = {c.hotkey: i for i, c in enumerate(candidates)}
    return (global_domain, global_general), sorted(scores, key=lambda s: order[s.hotkey])


def _evaluate_one(
    model: nn.Module,
    candidate: Candidate,
    domain_batches: Sequence[torch.Tensor],
    general_batches: Sequence[torch.Tensor],
    global_domain: float,
    global_general: float,
    config: ScoringConfig,
) -> SubmissionScore:
    domain = batch_losses(model, domain_batches)
    if not all(math.isfinite(x) for x in domain):
        bad = sum(not math.isfinite(x) for x in domain)
        return _reject(candidate, "non_finite", f"loss non-finite on {bad} of {len(domain)} held-out batches")
    domain_loss = _mean(domain)
    general_loss = None
    if general_batches:
        general = batch_losses(model, general_batches)
        general_loss = _mean(general)
        if not all(math.isfinite(x) for x in general):
            return _reject(
                candidate, "non_finite", "loss non-finite on general batches", domain_loss=domain_loss
            )
        limit = global_general * (1.0 + config.general_tolerance)
        if general_loss > limit:
            return _reject(
                candidate,
                "general_regression",
                f"general loss {general_loss:.4f} > {limit:.4f} (global {global_general:.4f} + {config.general_tolerance:.1%})",
                domain_loss=domain_loss,
                general_loss=general_loss,
            )
    utility = global_domain - domain_loss
    threshold = max(config.min_improvement, LOSS_RESOLUTION * abs(global_domain))
    if not utility > threshold:  # written so that a NaN utility is never an improvement
        return _reject(
            candidate,
            "no_improvement",
            f"domain loss {domain_loss:.6f} not below global {global_domain:.6f} by more than {threshold:.2e}",
            domain_loss=domain_loss,
            general_loss=general_loss,
        )
    logger.info(
        "scored hotkey=%s uid=%d loss=%.4f global=%.4f utility=%.4f",
        candidate.hotkey,
        candidate.uid,
        domain_loss,
        global_domain,
        utility,
    )
    return SubmissionScore(
        hotkey=candidate.hotkey,
        uid=candidate.uid,
        commit_block=candidate.commit_block,
        accepted=True,
        domain_loss=domain_loss,
        general_loss=general_loss,
        utility=max(0.0, utility),
    )


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
