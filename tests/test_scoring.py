"""Proof-of-Loss scoring: utility, rejections with reasons, ranking, EMA and chain weights."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_model

from connito.config import ScoringConfig
from connito.ml.moe import moe_layers, read_experts
from connito.protocol.scoring import Candidate, SubmissionScore, score_submissions
from connito.protocol.weights import chain_weights, rank_weights, update_ema

SELECTION = {0: [1, 2], 1: [3]}
DOMAIN = [random_batch(2, 16, seed=s) for s in range(3)]
GENERAL = [random_batch(2, 16, seed=100 + s) for s in range(2)]


def _grad_step(
    model, batches, lr: float, ascend: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Selected experts after one SGD step on ``batches`` (optionally ascending on ``ascend``)."""
    layers = moe_layers(model)
    params = [p for layer in layers for p in (layer.experts.gate_up_proj, layer.experts.down_proj)]
    for p in params:
        p.requires_grad_(True)
    loss = sum(model(input_ids=b, labels=b).loss for b in batches)
    if ascend:
        loss = loss - 3.0 * sum(model(input_ids=b, labels=b).loss for b in ascend)
    grads = torch.autograd.grad(loss, params)
    before = read_experts(model, SELECTION)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= lr * g
    after = read_experts(model, SELECTION)
    with torch.no_grad():
        from connito.ml.moe import write_experts

        write_experts(model, before)
        # unselected experts were also stepped: restore every expert row from a clean copy
    for p in params:
        p.requires_grad_(False)
    return after


def _candidate(hotkey: str, state, block: int, uid: int = 0) -> Candidate:
    from hashlib import sha256

    digest = sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    return Candidate(hotkey=hotkey, uid=uid, commit_block=block, tensors_sha256=digest, state=state)


@pytest.fixture
def setup():
    model = tiny_model("qwen3_moe")
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    global_state = read_experts(model, SELECTION)
    good = _grad_step(model, DOMAIN, lr=0.5)
    model.load_state_dict(clean)
    return model, clean, global_state, good


def _score(model, global_state, candidates, **cfg):
    return score_submissions(
        model,
        global_state,
        candidates,
        domain_batches=DOMAIN,
        general_batches=GENERAL,
        config=ScoringConfig(**{"general_tolerance": 1.0, **cfg}),
    )


def test_improving_submission_is_accepted_with_positive_utility(setup):
    model, _clean, global_state, good = setup
    (global_domain, _), [score] = _score(model, global_state, [_candidate("a", good, 10)])
    assert score.accepted and score.reason is None
    assert score.utility == pytest.approx(global_domain - score.domain_loss)
    assert score.utility > 0


def test_model_is_bit_identical_after_scoring(setup):
    model, clean, global_state, good = setup
    nan_state = {k: v.clone() for k, v in good.items()}
    next(iter(nan_state.values()))[0, 0] = float("nan")
    _score(model, global_state, [_candidate("a", good, 10), _candidate("b", nan_state, 11)])
    assert all(torch.equal(clean[k], v) for k, v in model.state_dict().items())


def test_zero_delta_is_lazy(setup):
    model, _clean, global_state, _good = setup
    _, [score] = _score(
        model, global_state, [_candidate("a", {k: v.clone() for k, v in global_state.items()}, 5)]
    )
    assert not score.accepted and score.reason == "lazy"


def test_non_finite_on_one_batch_rejects_the_whole_submission(setup):
    """An expert that blows up only on some tokens makes some batches inf: reject whole, never drop."""
    model, _clean, global_state, good = setup
    poisoned = {k: v.clone() for k, v in good.items()}
    for projection in ("gate_proj", "up_proj"):  # finite weights whose product overflows in fp32
        poisoned[f"model.layers.1.mlp.experts.3.{projection}.weight"] *= 1e30
    _, [score] = _score(model, global_state, [_candidate("a", poisoned, 5)])
    assert not score.accepted and score.reason == "non_finite"


def test_identical_tensors_later_commitment_is_duplicate(setup):
    model, _clean, global_state, good = setup
    copy = {k: v.clone() for k, v in good.items()}
    _, scores = _score(model, global_state, [_candidate("late", copy, 20), _candidate("early", good, 10)])
    by_hotkey = {s.hotkey: s for s in scores}
    assert by_hotkey["early"].accepted
    assert by_hotkey["late"].reason == "duplicate" and "hotkey=early" in by_hotkey["late"].detail


def test_near_copy_with_noise_is_duplicate(setup):
    model, _clean, global_state, good = setup
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + 1e-6 * torch.randn(v.shape, generator=generator) for k, v in good.items()}
    _, scores = _score(model, global_state, [_candidate("orig", good, 10), _candidate("copy", noisy, 12)])
    assert [s.reason for s in scores] == [None, "duplicate"]


def test_general_regression_is_rejected(setup):
    model, clean, global_state, _good = setup
    hurts_general = _grad_step(model, DOMAIN, lr=0.5, ascend=GENERAL)
    model.load_state_dict(clean)
    _, [score] = _score(model, global_state, [_candidate("a", hurts_general, 5)], general_tolerance=0.0)
    assert score.reason == "general_regression"


def test_worse_submission_gets_no_reward(setup):
    model, clean, global_state, _good = setup
    worse = _grad_step(model, DOMAIN, lr=-0.5)
    model.load_state_dict(clean)
    _, [score] = _score(model, global_state, [_candidate("a", worse, 5)])
    assert score.reason == "no_improvement" and score.utility == 0.0


def _s(hotkey: str, loss: float, block: int = 0, accepted: bool = True) -> SubmissionScore:
    return SubmissionScore(hotkey=hotkey, uid=0, commit_block=block, accepted=accepted, domain_loss=loss)


def test_rank_weights_prefer_lower_loss_and_cover_top_k_only():
    scores = [_s("c", 3.0), _s("a", 1.0), _s("b", 2.0), _s("x", 0.5, accepted=False)]
    weights = rank_weights(scores, ScoringConfig(top_k=2, rank_weighting="exponential", rank_decay=0.5))
    assert list(weights) == ["a", "b"]
    assert weights["a"] == pytest.approx(2 / 3) and sum(weights.values()) == pytest.approx(1.0)


def test_rank_ties_break_on_earlier_commitment():
    weights = rank_weights([_s("late", 1.0, block=9), _s("early", 1.0, block=3)], ScoringConfig(top_k=1))
    assert list(weights) == ["early"]


def test_no_accepted_submission_gives_no_weights():
    assert rank_weights([_s("a", 1.0, accepted=False)], ScoringConfig()) == {}


def test_ema_blends_and_forgets_deregistered_hotkeys():
    ema = update_ema({"a": 1.0, "gone": 1.0}, {"b": 1.0}, alpha=0.5, registered={"a", "b"})
    assert ema == {"a": 0.5, "b": 0.5}


def test_chain_weights_normalise_and_burn():
    weights = chain_weights({"a": 3.0, "b": 1.0}, {"a": 1, "b": 2}, burn_share=0.2, owner_uid=0)
    assert weights == pytest.approx({1: 0.6, 2: 0.2, 0: 0.2})
    assert chain_weights({}, {}, burn_share=0.0, owner_uid=None) == {}
