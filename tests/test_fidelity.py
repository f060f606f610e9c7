"""connito's held-out loss is transformers' own causal-LM loss: no load-balancing term, eval mode."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_TYPES, random_batch, tiny_model

from connito.ml.modeling import heldout_loss


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_heldout_loss_equals_transformers_causal_lm_loss(model_type):
    model = tiny_model(model_type)
    batches = [random_batch(2, 16, seed=s) for s in range(3)]
    ours = heldout_loss(model, batches)
    with torch.no_grad():
        theirs = [model(input_ids=b, labels=b, output_router_logits=False).loss.item() for b in batches]
    # equal-sized batches: the token-weighted mean equals the mean of per-batch means
    assert abs(ours - sum(theirs) / len(theirs)) < 1e-5


def test_heldout_loss_excludes_the_router_aux_loss():
    """With router logits on, transformers' loss adds the aux term; ours must not."""
    model = tiny_model("qwen3_moe", router_aux_loss_coef=0.5)
    batch = random_batch(2, 16)
    with torch.no_grad():
        with_aux = model(input_ids=batch, labels=batch, output_router_logits=True).loss.item()
    assert abs(heldout_loss(model, [batch]) - with_aux) > 1e-3


def test_heldout_loss_runs_in_eval_mode_and_restores_training_flag():
    model = tiny_model("mixtral", router_jitter_noise=0.5)
    model.train()
    batch = random_batch(2, 16)
    assert heldout_loss(model, [batch]) == heldout_loss(model, [batch])  # no jitter noise in eval
    assert model.training


def test_heldout_loss_is_non_finite_when_any_batch_is():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    batches = [random_batch(2, 16, seed=s) for s in range(2)]
    assert not math.isfinite(heldout_loss(model, batches))
