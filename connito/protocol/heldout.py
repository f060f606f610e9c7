"""Held-out measurements of a whole expert state: the seeded samples, their losses, the drift cap.

Scoring a submission (``connito.protocol.scoring``) and re-checking a merge before it is
published use the same samples and the same arithmetic (per-batch means, then their mean); the
library records a version's losses with these functions too, so a rebuild of the library gives
the numbers the lead recorded. Each function writes the experts it measures into the model and
restores the given state afterwards.

May import: connito.config, connito.data, connito.ml.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from connito.config import ScoringConfig
from connito.data import DomainData
from connito.ml.modeling import mean_batch_loss
from connito.ml.moe import write_experts

__all__ = ["LossFn", "seeded_samples", "heldout_losses", "general_ceiling"]

LossFn = Callable[[dict[str, torch.Tensor], int], tuple[float, float]]  # (experts, seed) -> (domain, general)


def seeded_samples(
    data: DomainData, scoring: ScoringConfig, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (domain, general) held-out batches of ``seed``: what submissions and merges are scored on."""
    domain = data.heldout_sample(seed, scoring.eval_batches, scoring.eval_batch_size)
    general = (
        data.general_sample(seed, scoring.general_batches, scoring.eval_batch_size)
        if scoring.general_batches
        else []
    )
    return domain, general


def heldout_losses(
    model: nn.Module,
    experts: dict[str, torch.Tensor],
    *,
    restore: dict[str, torch.Tensor],
    data: DomainData,
    scoring: ScoringConfig,
    seed: int,
) -> tuple[float, float]:
    """Mean (domain, general) held-out loss of ``experts`` in ``model``; ``restore`` is written back.

    Per-batch means, then their mean, on the seeded samples of ``scoring``: the lead's
    re-check of a merge and the library's record use this one arithmetic, so a rebuild of the
    library gives the numbers the lead recorded.
    """
    domain, general = seeded_samples(data, scoring, seed)
    try:
        write_experts(model, experts)
        return mean_batch_loss(model, domain), mean_batch_loss(model, general)
    finally:
        write_experts(model, restore)


def general_ceiling(
    model: nn.Module,
    general_batches: Sequence[torch.Tensor],
    *,
    base_experts: dict[str, torch.Tensor],
    restore: dict[str, torch.Tensor],
    limit: float | None,
) -> float | None:
    """The base experts' general loss on this cycle's sample x (1 + ``limit``); None when off.

    Measured on the same batches as the submissions, so the cap moves with the sample but never
    with the global: forgetting cannot add up over cycles. ``restore`` is written back.
    """
    if limit is None or not general_batches:
        return None
    try:
        write_experts(model, base_experts)
        base_general = mean_batch_loss(model, general_batches)
    finally:
        write_experts(model, restore)
    return base_general * (1 + limit)
