"""Incentive integrity, as an attacker would try it: replays, scaled updates, assignment games.

Own-work evidence and private evaluation data are exercised with trained updates in
``test_own_work.py``; whole subnets with the adversaries in ``test_neurons_e2e.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scoring import DOMAIN, GENERAL, _candidate, _grad_step, setup  # noqa: F401 - fixture

from connito.config import ScoringConfig
from connito.data.assignment import assigned_mask, control_mask
from connito.protocol.replay import MERGE_SOURCE, ReplayHistory
from connito.protocol.scoring import pseudo_gradient, score_submissions
from connito.protocol.weights import ranked, weight_cosine

KEYS = np.random.default_rng(0).integers(0, 2**63, size=20_000, dtype=np.int64).astype(np.uint64)


# ---- assignment ----------------------------------------------------------------------------


def test_assignments_are_own_per_hotkey_and_cycle_and_never_control():
    fraction = 1 / 64
    control = control_mask(KEYS, domain="d", cycle=3, fraction=fraction)
    a = assigned_mask(KEYS, domain="d", cycle=3, hotkey="alice", fraction=fraction)
    b = assigned_mask(KEYS, domain="d", cycle=3, hotkey="bob", fraction=fraction)
    a_next = assigned_mask(KEYS, domain="d", cycle=4, hotkey="alice", fraction=fraction)
    for mask in (control, a, b):
        assert abs(mask.mean() - fraction) < 0.3 * fraction
    assert not (a & control).any() and not (b & control).any()
    assert (a & b).sum() < 0.1 * a.sum()  # two miners share about fraction^2 of the documents
    assert (a & a_next).sum() < 0.1 * a.sum()  # a new cycle is a new assignment
    assert np.array_equal(a, assigned_mask(KEYS, domain="d", cycle=3, hotkey="alice", fraction=fraction))
    assert not np.array_equal(a, assigned_mask(KEYS, domain="e", cycle=3, hotkey="alice", fraction=fraction))


# ---- replay --------------------------------------------------------------------------------


def _scored(model, global_state, candidates, **kwargs):
    config = ScoringConfig(general_tolerance=1.0, **kwargs.pop("config", {}))
    _, scores = score_submissions(
        model,
        global_state,
        candidates,
        domain_batches=DOMAIN,
        general_batches=GENERAL,
        config=config,
        **kwargs,
    )
    return {s.hotkey: s for s in scores}


def _applied(global_state, delta_of: dict[str, torch.Tensor], factor: float = 1.0):
    """``global - factor * delta``: an old update (a pseudo-gradient) applied to this global."""
    return {k: v - factor * delta_of[k] for k, v in global_state.items()}


@pytest.mark.parametrize("back", [1, 2])
@pytest.mark.parametrize("factor", [1.0, 0.5, 3.0])
def test_an_earlier_accepted_update_replayed_at_any_scale_is_a_replay(setup, tmp_path, back, factor):  # noqa: F811
    model, clean, global_state, good = setup
    old_delta = {k: global_state[k] - good[k] for k in global_state}
    history = ReplayHistory(tmp_path / "replay")
    history.add(5 - back, "honest-miner", pseudo_gradient(global_state, good))
    replay = _applied(global_state, old_delta, factor)
    fresh = _grad_step(model, GENERAL, lr=0.5)  # a different direction: not a replay
    model.load_state_dict(clean)
    scores = _scored(
        model,
        global_state,
        [_candidate("replayer", replay, 10), _candidate("fresh", fresh, 11)],
        history=ReplayHistory(tmp_path / "replay"),  # read back from disk: a restart forgets nothing
        cycle=5,
    )
    assert scores["replayer"].reason == "replay"
    assert f"hotkey=honest-miner's accepted update of cycle {5 - back}" in scores["replayer"].detail
    assert scores["fresh"].reason != "replay"


def test_the_last_merge_continued_is_a_replay(setup, tmp_path):  # noqa: F811
    model, _clean, global_state, good = setup
    previous = {k: 2 * global_state[k] - good[k] for k in global_state}  # the global before the merge
    history = ReplayHistory(tmp_path / "replay")
    history.add(4, MERGE_SOURCE, pseudo_gradient(previous, global_state))
    continued = {k: global_state[k] + 0.7 * (global_state[k] - previous[k]) for k in global_state}
    scores = _scored(model, global_state, [_candidate("m", continued, 10)], history=history, cycle=5)
    assert scores["m"].reason == "replay" and "the merged update of cycle 4" in scores["m"].detail


def test_replays_older_than_the_window_are_left_to_the_other_checks(setup, tmp_path):  # noqa: F811
    model, _clean, global_state, good = setup
    history = ReplayHistory(tmp_path / "replay")
    history.add(1, "old", pseudo_gradient(global_state, good))
    scores = _scored(
        model,
        global_state,
        [_candidate("m", good, 10)],
        history=history,
        cycle=5,
        config={"replay_cycles": 3},
    )
    assert scores["m"].reason != "replay"
    history.prune(keep_from=2)
    assert not (tmp_path / "replay" / "1").exists()


def test_a_damaged_history_entry_checks_nothing_and_breaks_nothing(setup, tmp_path):  # noqa: F811
    model, _clean, global_state, good = setup
    history = ReplayHistory(tmp_path / "replay")
    history.add(4, "a", pseudo_gradient(global_state, good))
    (tmp_path / "replay" / "4" / "a.safetensors").write_bytes(b"\x00" * 7)
    scores = _scored(model, global_state, [_candidate("m", good, 10)], history=history, cycle=5)
    assert scores["m"].accepted


# ---- scaling -------------------------------------------------------------------------------


def _rank(scores, hotkey):
    order = [s.hotkey for s in ranked(list(scores.values()))]
    return order.index(hotkey) if hotkey in order else None


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
def test_scaling_up_past_the_step_length_gains_nothing_even_without_own_work(setup, factor):  # noqa: F811
    """Without own-work evidence updates are only ever shortened to the step length: one scaled
    past it is measured at the very point its unscaled self (at the step length) is. Scaled
    updates with own work, at every factor, are in ``test_own_work.py``."""
    model, clean, global_state, good = setup
    rival = _grad_step(model, DOMAIN[:2], lr=0.4)
    model.load_state_dict(clean)
    delta = {k: global_state[k] - good[k] for k in global_state}
    rho = float(pseudo_gradient(global_state, good).norm())  # say, last cycle's median norm
    outcomes = {}
    for name, update in (("unscaled", good), ("scaled", _applied(global_state, delta, factor))):
        scores = _scored(
            model, global_state, [_candidate("rival", rival, 5), _candidate("m", update, 6)], step_norm=rho
        )
        outcomes[name] = (_rank(scores, "m"), scores["m"].domain_loss)
    assert outcomes["scaled"][1] == pytest.approx(outcomes["unscaled"][1], abs=1e-5)
    assert outcomes["scaled"][0] == outcomes["unscaled"][0]


def test_the_step_length_is_fixed_by_the_last_cycle_before_any_submission_is_seen():
    from connito.node.validator_history import previous_step_norm
    from connito.node.validator_state import CycleResult, ScoreRow

    rows = [
        ScoreRow(hotkey="a", uid=1, accepted=True, update_norm=2.0),
        ScoreRow(hotkey="b", uid=2, accepted=True, update_norm=3.0),
        ScoreRow(hotkey="c", uid=3, accepted=True, update_norm=10.0),
        ScoreRow(hotkey="scaled-but-rejected", uid=4, accepted=False, update_norm=99.0),
    ]
    assert previous_step_norm(CycleResult(cycle=4, scores=rows)) == 3.0
    assert previous_step_norm(CycleResult(cycle=4)) is None
    assert previous_step_norm(None) is None


def test_without_normalising_a_scaled_update_would_have_bought_rank(setup):  # noqa: F811
    """The attack the normalised step stops: the same direction, a longer step, a lower loss."""
    model, _clean, global_state, good = setup
    delta = {k: global_state[k] - good[k] for k in global_state}
    losses = {}
    for factor in (1.0, 2.0):
        scores = _scored(
            model,
            global_state,
            [_candidate("m", _applied(global_state, delta, factor), 6)],
            config={"normalised_step": False},
        )
        losses[factor] = scores["m"].domain_loss
    assert losses[2.0] < losses[1.0]


# ---- validators agree ----------------------------------------------------------------------


def test_weight_cosine():
    assert weight_cosine({1: 0.5, 2: 0.5}, {1: 1.0, 2: 1.0}) == pytest.approx(1.0)
    assert weight_cosine({1: 1.0}, {2: 1.0}) == 0.0
    assert weight_cosine({}, {}) == 1.0
    assert weight_cosine({1: 4 / 7, 2: 2 / 7, 3: 1 / 7}, {1: 2 / 7, 2: 4 / 7, 3: 1 / 7}) == pytest.approx(
        17 / 21
    )


def test_a_small_domain_still_gives_every_miner_and_the_control_set_documents():
    """1/128 of 540 documents is about four: some hotkeys would draw none and could not train."""
    from connito.data.assignment import MIN_DOCUMENTS

    keys = KEYS[:540]
    for cycle in range(20):
        control = control_mask(keys, domain="d", cycle=cycle, fraction=1 / 128)
        assert control.sum() >= MIN_DOCUMENTS
        for hotkey in ("a", "b", "c"):
            mine = assigned_mask(keys, domain="d", cycle=cycle, hotkey=hotkey, fraction=1 / 128)
            assert mine.sum() >= MIN_DOCUMENTS and not (mine & control).any()


def test_the_history_keeps_the_screens_sketch_without_reading_the_payload_again(setup, tmp_path):  # noqa: F811
    """An accepted update is remembered from the sketch the copy screen made: the same bits as
    sketching it anew, and no second read of the payload (the validator reads it from disk)."""
    import dataclasses as _dc

    from connito.node.validator_history import remember_accepted
    from connito.protocol.scoring import Candidate

    model, _clean, global_state, good = setup
    reads = []

    def load():
        reads.append(1)
        return good

    candidate = Candidate(hotkey="miner", uid=1, commit_block=10, tensors_sha256="sha-good", load=load)
    score = _scored(model, global_state, [candidate])["miner"]
    assert score.accepted and score.sketch is not None
    screened = len(reads)
    history = ReplayHistory(tmp_path / "replay")
    ctx = _dc.make_dataclass("Ctx", ["config"])(
        config=_dc.make_dataclass("Cfg", ["scoring"])(scoring=ScoringConfig(replay_cycles=3))
    )
    remember_accepted(ctx, history, 1, [score])

    assert len(reads) == screened  # not read again
    fresh = ReplayHistory(tmp_path / "replay-fresh")
    fresh.add(1, "miner", pseudo_gradient(global_state, good))
    stored = ReplayHistory(tmp_path / "replay")._read(1)
    again = fresh._read(1)
    assert [s for s, _ in stored] == [s for s, _ in again] == ["miner"]
    assert torch.equal(stored[0][1].q, again[0][1].q) and torch.equal(stored[0][1].scales, again[0][1].scales)
