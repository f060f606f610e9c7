"""The largest change to any expert weight that H honest AdamW steps can make.

A pseudo-gradient is only as trustworthy as its size: a miner can rescale an expert's up and down
projections by c and 1/c (the same function, so the same loss) and hand the merge an update 10^3
times the honest norm. Instead of comparing miners with each other (a median that sybils can
drag down), every validator derives one bound from the domain config alone: with a constant
learning rate, AdamW's step on a coordinate is ``lr * m_hat / (sqrt(v_hat) + eps)`` plus the
decoupled decay ``lr * wd * w``, and ``|m_hat| / sqrt(v_hat)`` is bounded by a function of the
betas only (Cauchy-Schwarz over the two exponential averages). A submission that moved any
weight further than ``factor x`` that bound was not trained by the protocol's inner optimizer.
"""

from __future__ import annotations

import math

import torch

from connito.config import TrainingConfig

__all__ = ["adam_ratio_bound", "max_weight_change", "moments_may_carry"]


def adam_ratio_bound(beta1: float, beta2: float, step: int) -> float:
    """Upper bound of ``|m_hat_t| / sqrt(v_hat_t)`` at step ``t`` for any gradient sequence.

    ``m_t = (1 - b1) sum_k b1^k g_{t-k}`` and ``v_t >= (1 - b2) sum_k b2^k g_{t-k}^2``; writing
    ``b1^k = (b1 / sqrt(b2))^k sqrt(b2)^k`` and applying Cauchy-Schwarz gives
    ``|m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_{k<t} (b1^2 / b2)^k)``; the bias
    corrections multiply by ``sqrt(1 - b2^t) / (1 - b1^t)``. At ``t = 1`` this is exactly 1.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if beta1 == 0.0:
        return math.sqrt((1 - beta2**step) / (1 - beta2))
    ratio = beta1 * beta1 / beta2
    geometric = float(step) if ratio == 1.0 else (1 - ratio**step) / (1 - ratio)
    return (1 - beta1) / (1 - beta1**step) * math.sqrt(geometric) * math.sqrt((1 - beta2**step) / (1 - beta2))


def moments_may_carry(training: TrainingConfig) -> bool:
    """Whether a miner may carry its AdamW moments into the next cycle and stay within the bound.

    Only when ``b1^2 < b2``: the bound then holds at every step count. Otherwise it is taken at
    ``t = inner_steps`` (a fresh optimizer), which a longer-lived optimizer can exceed.
    """
    beta1, beta2 = training.betas
    return training.keep_optimizer_state and beta1 * beta1 < beta2


def _ratio_over_any_step(beta1: float, beta2: float, steps: int) -> float:
    """The ratio bound over every step a miner may be at: the ``t -> inf`` limit when it exists.

    Miners may keep their AdamW state across cycles, so the step count need not restart at 1;
    the bound increases with ``t``, so its limit covers every step. When ``b1^2 >= b2`` it has
    no limit, and the bound at ``t = steps`` (a fresh optimizer each cycle) is used.
    """
    if beta1 * beta1 < beta2:
        return (1 - beta1) / math.sqrt(1 - beta2) / math.sqrt(1 - beta1 * beta1 / beta2)
    return adam_ratio_bound(beta1, beta2, steps)


def max_weight_change(
    training: TrainingConfig, global_state: dict[str, torch.Tensor], *, factor: float
) -> float:
    """``factor x`` the largest ``|local - global|`` any coordinate can reach in H inner steps.

    Sums the per-step bound over the H steps (Adam's ratio bound, plus the decoupled weight
    decay acting on a weight that may itself have grown by the steps so far), and adds two
    rounding units of the weights' dtype at their largest magnitude, since a bf16 expert
    written back after fp32 training can differ by that much without any training at all.
    """
    beta1, beta2 = training.betas
    ratio = _ratio_over_any_step(beta1, beta2, training.inner_steps)
    largest = max((float(t.detach().abs().max()) for t in global_state.values() if t.numel()), default=0.0)
    moved = 0.0
    for _ in range(training.inner_steps):
        moved += training.lr * (ratio + training.weight_decay * (largest + moved))
    dtypes = {t.dtype for t in global_state.values()}
    rounding = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point), default=0.0)
    return factor * (moved + 2 * rounding * largest)
