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

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from connito.config import ScoringConfig
from connito.ml.delta_sketch import DeltaSketch, cosine_upper_bound, sketch_delta
from connito.ml.eval_pool import EvalPool
from connito.ml.modeling import batch_losses, mean_batch_loss
from connito.ml.moe import write_experts
from connito.protocol.own_work import OwnWorkProbe, nearest_other
from connito.protocol.step_length import LOSS_RESOLUTION, at_step, improving_median

if TYPE_CHECKING:
    from connito.protocol.replay import ReplayHistory

logger = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "SubmissionScore",
    "pseudo_gradient",
    "cosine_similarity",
    "score_submissions",
]


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
    update_norm: float | None = None  # |pseudo-gradient| as sent
    scored_norm: float | None = None  # the step length it was measured at (the cycle's, or as sent)
    assigned_drop: float | None = None  # own-work evidence (connito.protocol.own_work)
    control_drop: float | None = None
    # the int8 sketch of its pseudo-gradient from the copy screen, for the replay history to keep
    sketch: DeltaSketch | None = field(default=None, repr=False, compare=False)


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
    evidence: tuple[float, float] | None = None,
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
        assigned_drop=evidence[0] if evidence else None,
        control_drop=evidence[1] if evidence else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _History:
    """The replay check's inputs: earlier cycles' sketches, this cycle, and how far back to look."""

    store: ReplayHistory
    cycle: int
    window: int


def _screen_copies(
    candidates: Sequence[Candidate],
    global_state: dict[str, torch.Tensor],
    cosine_threshold: float,
    max_change: float | None,
    history: _History | None = None,
) -> tuple[list[tuple[Candidate, DeltaSketch]], list[SubmissionScore]]:
    """Drop lazy, oversized and copied submissions before any evaluation; earliest commitment wins ties.

    ``max_change`` bounds how far any weight may have moved (``connito.ml.update_bound``): a larger
    move is a rescaled or foreign update, never merged or published, however good its loss.

    Candidates are visited in ``(commit_block, hotkey)`` order, so copies committed in the same
    block go to the lexically smaller hotkey on every validator, whatever the arrival order.
    A kept pseudo-gradient is held only as its int8 sketch (a quarter of an fp32 delta); see
    ``_find_twin``. ``history`` holds earlier cycles' accepted and merged updates: a submission
    repeating one is a ``replay`` (``connito.protocol.replay``).
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
        replayed = (
            history.store.match(
                sketch, cycle=history.cycle, window=history.window, threshold=cosine_threshold
            )
            if history is not None
            else None
        )
        if replayed is not None:
            rejected.append(_reject(candidate, "replay", replayed.describe()))
            continue
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
    own_work: OwnWorkProbe | None = None,
    history: ReplayHistory | None = None,
    cycle: int = 0,
    step_norm: float | None = None,
) -> tuple[tuple[float, float], list[SubmissionScore]]:
    """Score every candidate against the global experts that ``model`` holds on entry.

    Returns ``((global_domain_loss, global_general_loss), scores)`` with one score per candidate.
    ``model`` holds exactly the global experts again on return, whatever happened. ``progress``
    shows a bar over the candidates (evaluation is the validator's longest step). ``max_change``
    is the largest allowed ``|local - global|`` of any weight (None: unbounded). ``pool`` spreads
    the candidates over its replicas (one device each; ``model`` may be one of them), with the
    same scores as on ``model`` alone; each replica holds the global experts again on return.
    ``own_work`` checks each update learned its miner's assigned documents; ``history`` holds
    earlier cycles' updates, which ``cycle``'s submissions may not repeat.

    With ``config.normalised_step`` every update is measured at the same step length ``rho``:
    ``global - rho * d / |d|``. Scaling an update then changes nothing that is measured, so it
    cannot buy rank. ``step_norm`` is ``rho`` (the validator passes the median norm of the last
    cycle's accepted updates, which no submission of this cycle can move); None takes the median
    norm of this cycle's submissions that lower the domain loss as sent. Without an ``own_work``
    probe a shorter update is measured as sent (capped at ``rho``, never stretched): stretching a
    tiny random update to ``rho`` turns its first-order accident into a measurable "improvement",
    and only own-work evidence rejects noise.
    """
    global_domain = mean_batch_loss(model, domain_batches)
    global_general = mean_batch_loss(model, general_batches)
    replay = (
        _History(store=history, cycle=cycle, window=config.replay_cycles) if history is not None else None
    )
    kept, scores = _screen_copies(candidates, global_state, config.duplicate_cosine, max_change, replay)
    sketches = {candidate.hotkey: sketch for candidate, sketch in kept}
    norms = {hotkey: sketch.norm for hotkey, sketch in sketches.items()}
    nearest = nearest_other(kept) if own_work is not None else {}
    step = None
    if kept and config.normalised_step:
        step = step_norm or improving_median(
            model, global_state, [c for c, _ in kept], norms, domain_batches, config
        )

    def evaluate(replica: nn.Module, candidate: Candidate) -> SubmissionScore:
        experts = candidate.experts()  # read here, one candidate per replica in memory at a time
        measured_at = norms[candidate.hotkey]
        if step is not None and (own_work is not None or measured_at > step):
            experts, measured_at = at_step(global_state, experts, step / measured_at), step
        if own_work is not None:  # the global's losses on the assignments probed, while it is resident
            for hotkey in (
                candidate.hotkey,
                *([nearest[candidate.hotkey][0]] if candidate.hotkey in nearest else []),
            ):
                own_work.baseline(replica, hotkey)
        try:
            write_experts(replica, experts)
            score = _evaluate_one(
                replica,
                candidate,
                domain_batches,
                general_batches,
                (global_domain, global_general),
                config,
                own_work=(own_work, nearest.get(candidate.hotkey)) if own_work is not None else None,
            )
        finally:
            write_experts(replica, global_state)
        return dataclasses.replace(
            score,
            update_norm=norms[candidate.hotkey],
            scored_norm=measured_at,
            sketch=sketches[candidate.hotkey],
        )

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
    global_losses: tuple[float, float],
    config: ScoringConfig,
    *,
    own_work: tuple[OwnWorkProbe, tuple[str, float] | None] | None,
) -> SubmissionScore:
    global_domain, global_general = global_losses
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
    evidence: tuple[float, float] | None = None
    if own_work is not None:
        probe, closest = own_work
        verdict = probe.measure(model, candidate.hotkey, nearest=closest)
        evidence = (verdict.assigned_drop, verdict.control_drop)
        if not verdict.passes(probe.margin):
            reason, detail = verdict.reason(probe.margin)
            return _reject(
                candidate,
                reason,
                detail,
                domain_loss=domain_loss,
                general_loss=general_loss,
                evidence=evidence,
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
            evidence=evidence,
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
        assigned_drop=evidence[0] if evidence else None,
        control_drop=evidence[1] if evidence else None,
    )
