"""The per-weight move bound: real AdamW never exceeds it; a rescaled update always does."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connito.config import TrainingConfig
from connito.ml.update_bound import adam_ratio_bound, max_weight_change, moments_may_carry


def test_ratio_bound_is_exact_at_the_first_step_and_grows_to_its_limit():
    assert adam_ratio_bound(0.9, 0.95, 1) == pytest.approx(1.0)
    limit = 0.1 / math.sqrt(0.05) / math.sqrt(1 - 0.81 / 0.95)
    values = [adam_ratio_bound(0.9, 0.95, t) for t in range(1, 2000)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(limit, rel=1e-9)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adam_ratio_bound(0.9, 0.95, 0)


def _adamw_move(
    training: TrainingConfig, start: torch.Tensor, gradients: list[torch.Tensor], *, earlier: int = 0
) -> torch.Tensor:
    """How far AdamW moves ``start`` over the gradients after the first ``earlier`` of them: those
    are an earlier cycle whose moments the optimizer carries (its weights restart at ``start``)."""
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW(
        [weight], lr=training.lr, betas=training.betas, weight_decay=training.weight_decay, eps=1e-12
    )
    for index, gradient in enumerate(gradients):
        if index == earlier:
            with torch.no_grad():
                weight.copy_(start)
        weight.grad = gradient.clone()
        optimizer.step()
    return (weight.detach() - start).abs()


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 40),
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.95]),
    beta2=st.sampled_from([0.95, 0.99, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.1, 1.0]),
    scales=st.lists(st.floats(1e-6, 1e6), min_size=40, max_size=40),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=40, max_size=40),
)
def test_adamw_never_moves_a_weight_past_the_bound(steps, beta1, beta2, weight_decay, scales, signs):
    """Adversarial gradient magnitudes (spikes after long quiet stretches, sign flips, constants):
    the measured move stays within the bound with factor 1."""
    training = TrainingConfig(inner_steps=steps, lr=1e-3, betas=(beta1, beta2), weight_decay=weight_decay)
    start = torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=torch.float64)
    gradients = [
        torch.tensor([s * g, -s * g, s, g * 1e-3], dtype=torch.float64)
        for s, g in zip(scales[:steps], signs[:steps], strict=True)
    ]
    moved = float(_adamw_move(training, start, gradients).max())
    assert moved <= max_weight_change(training, {"w": start}, factor=1.0) * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(
    earlier=st.integers(1, 60),
    steps=st.integers(1, 30),
    betas=st.sampled_from([(0.9, 0.95), (0.5, 0.95), (0.9, 0.999), (0.0, 0.99)]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    scales=st.lists(st.floats(1e-6, 1e6), min_size=90, max_size=90),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=90, max_size=90),
)
def test_carried_moments_stay_within_the_bound(earlier, steps, betas, weight_decay, scales, signs):
    """A miner that carries its moments from earlier cycles (keep_optimizer_state) still moves no
    weight past the bound in its H steps, whatever the earlier gradients were."""
    training = TrainingConfig(inner_steps=steps, lr=1e-3, betas=betas, weight_decay=weight_decay)
    assert moments_may_carry(training)
    start = torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=torch.float64)
    gradients = [
        torch.tensor([s * g, -s * g, s, g * 1e-3], dtype=torch.float64)
        for s, g in zip(scales[: earlier + steps], signs[: earlier + steps], strict=True)
    ]
    moved = float(_adamw_move(training, start, gradients, earlier=earlier).max())
    assert moved <= max_weight_change(training, {"w": start}, factor=1.0) * (1 + 1e-9)


def test_moments_do_not_carry_where_the_bound_has_no_limit():
    assert not moments_may_carry(TrainingConfig(betas=(0.99, 0.95)))
    assert not moments_may_carry(TrainingConfig(keep_optimizer_state=False))
    assert moments_may_carry(TrainingConfig(betas=(0.9, 0.95)))


def test_bound_scales_with_steps_and_lr_and_covers_bf16_rounding():
    base = TrainingConfig(inner_steps=60, lr=1e-3)
    weights = {"w": torch.full((4,), 0.25)}
    one = max_weight_change(base, weights, factor=1.0)
    assert max_weight_change(base.model_copy(update={"inner_steps": 120}), weights, factor=1.0) > 1.9 * one
    assert max_weight_change(base.model_copy(update={"lr": 2e-3}), weights, factor=1.0) > 1.9 * one
    assert max_weight_change(base, weights, factor=2.0) == pytest.approx(2 * one)
    bf16 = {"w": weights["w"].to(torch.bfloat16)}
    rounding = torch.finfo(torch.bfloat16).eps * 0.25
    assert max_weight_change(base, bf16, factor=1.0) == pytest.approx(one + 2 * rounding, rel=1e-6)


def test_a_rescaled_expert_moves_far_past_the_bound():
    """The function-preserving rescale (up x c, down / c) that a norm poisoner uses."""
    torch.manual_seed(0)
    up, down = torch.randn(8, 16) * 0.02, torch.randn(16, 8) * 0.02
    training = TrainingConfig(inner_steps=60, lr=1e-3)
    bound = max_weight_change(training, {"up": up, "down": down}, factor=2.0)
    for scale in (10.0, 1e3):
        moved = max(float((up * scale - up).abs().max()), float((down / scale - down).abs().max()))
        assert moved > bound, (scale, moved, bound)
