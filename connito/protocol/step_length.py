"""The step length every update is scored at, so that scaling an update buys nothing.

A pseudo-gradient ``d = global - local`` is measured at ``global - rho * d / |d|``: the same point
whatever factor the miner multiplied its update by. ``rho`` is fixed before the cycle's
submissions are seen (the median norm of the last cycle's accepted updates); in a cycle without
one it is the median norm of the updates that lower the loss as sent.

May import: connito.config, connito.ml.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from connito.config import ScoringConfig
from connito.ml.modeling import mean_batch_loss
from connito.ml.moe import write_experts

if TYPE_CHECKING:
    from connito.protocol.scoring import Candidate

__all__ = ["LOSS_RESOLUTION", "at_step", "improving_median"]

# Smallest loss drop, as a share of the global loss, that counts as an improvement. Each batch
# loss is an fp32 sum over thousands of tokens, rounded to ~sqrt(tokens) * 2**-24 of its size
# (5e-6 at 2,048 tokens): below this a difference is rounding, or the first-order accident of a
# random direction, not learning. Without it, random noise of small norm on the global experts
# (a lazy miner dodging the zero-delta check) measures "better" about half the time and earns
# rank weight. ``ScoringConfig.min_improvement`` can only raise the bar.
LOSS_RESOLUTION = 1e-5


def at_step(
    global_state: dict[str, torch.Tensor], local: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    """``global - factor * (global - local)`` per tensor, computed in fp32, stored in each tensor's dtype."""
    return {
        key: (value.float() - factor * (value.float() - local[key].float())).to(value.dtype)
        for key, value in global_state.items()
    }


def improving_median(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    kept: Sequence[Candidate],
    norms: dict[str, float],
    domain_batches: Sequence[torch.Tensor],
    config: ScoringConfig,
) -> float:
    """The median norm of the updates that lower the domain loss as sent (no step fixed yet).

    Used when no earlier cycle fixed the step length. Only improving updates count: a crowd of
    tiny random updates must not shrink everyone's step to nothing (nor huge ones stretch it).
    """
    probe = domain_batches[:2]  # a coarse check: does it lower the loss at all
    global_probe = mean_batch_loss(model, probe)
    threshold = max(config.min_improvement, LOSS_RESOLUTION * abs(global_probe))
    improving = []
    for candidate in kept:
        try:
            write_experts(model, candidate.experts())
            if global_probe - mean_batch_loss(model, probe) > threshold:
                improving.append(norms[candidate.hotkey])
        finally:
            write_experts(model, global_state)
    return statistics.median(improving or list(norms.values()))
