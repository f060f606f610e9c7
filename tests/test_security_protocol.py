"""Protocol attacks and their defences: commit binding, deadlines, copies, replay, lazy work, weights.

Each test names the attack it mounts; ``docs/security.md`` maps attack -> defence ->
test. Most tests run the validator's own gate functions (``observe_commitments``, ``precheck``,
``fetch_and_verify``, ``score_submissions``, ``rank_weights``) on crafted chain records and real
checkpoints in a ``LocalStore``; a few drive real ``Validator``/``Miner`` objects on a manual-clock
``LocalChain``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from security_fixtures import (
    Domain,
    FlakyChain,
    build_domain,
    build_net,
    commit_record,
    hotkey_of,
    make_submission,
    perturbed,
    reveal_record,
)

from connito.chain.local import LocalChain
from connito.config import ScoringConfig
from connito.errors import InvalidSubmission
from connito.hub import LocalStore
from connito.ml.modeling import load_model
from connito.ml.moe import moe_layers, read_experts, write_experts
from connito.node.validator_state import CycleResult
from connito.protocol.commitments import CommitPayload, encode_commitment
from connito.protocol.phases import phase, phase_bounds
from connito.protocol.scoring import (
    Candidate,
    SubmissionScore,
    cosine_similarity,
    pseudo_gradient,
    score_submissions,
)
from connito.protocol.submissions import Observation, fetch_and_verify, observe_commitments, precheck
from connito.protocol.weights import chain_weights, rank_weights, ranked, update_ema

CYCLE = 2  # a cycle away from genesis, so "one block before" any window is a real block
HONEST, COPIER = hotkey_of("honest"), hotkey_of("copier")


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> Domain:
    return build_domain(tmp_path_factory.mktemp("domain"))


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "hub")


def _window(domain: Domain, name: str, cycle: int = CYCLE) -> tuple[int, int]:
    return phase_bounds(cycle, name, domain.config.cycle)


def _observe(domain: Domain, records, observed=None) -> dict[int, dict[str, Observation]]:
    observed = {} if observed is None else observed
    for record in records:  # the chain shows one commitment per hotkey at a time: fold them in order
        observe_commitments(observed, [record], domain.config, ignore=set())
    return observed


def _trained(domain: Domain, seed: int = 1) -> dict[str, torch.Tensor]:
    return perturbed(domain.global_experts, seed=seed, scale=0.05)


def _honest_records(domain: Domain, sub, hotkey: str = HONEST, cycle: int = CYCLE):
    commit_first, _ = _window(domain, "commit", cycle)
    reveal_first, _ = _window(domain, "reveal", cycle)
    return [
        commit_record(hotkey, commit_first, cycle=cycle, digest=sub.digest),
        reveal_record(hotkey, reveal_first, cycle=cycle, ref=sub.ref, manifest_sha=sub.manifest_sha),
    ]


def _verify(
    domain: Domain, store: LocalStore, entry: Observation, tmp_path, *, hotkey: str, cycle: int = CYCLE
):
    return fetch_and_verify(
        store,
        entry,
        tmp_path / "downloads" / hotkey,
        hotkey=hotkey,
        uid=1,
        cycle=cycle,
        config=domain.config,
        selection=domain.selection,
        expected=domain.expected,
        global_revision=domain.global_revision,
    )


def _rejection(domain, store, entry, tmp_path, *, hotkey: str, cycle: int = CYCLE) -> str:
    assert precheck(entry) is None, precheck(entry)
    with pytest.raises(InvalidSubmission) as info:
        _verify(domain, store, entry, tmp_path, hotkey=hotkey, cycle=cycle)
    return info.value.reason


def test_honest_submission_passes_the_gate(domain, store, tmp_path):
    """The control for every rejection below: the same path accepts an honest miner."""
    sub = make_submission(
        domain, store, tmp_path / "honest", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain)
    )
    entry = _observe(domain, _honest_records(domain, sub))[CYCLE][HONEST]
    candidate = _verify(domain, store, entry, tmp_path, hotkey=HONEST)
    assert candidate.tensors_sha256 == sub.manifest.tensors_sha256
    assert candidate.commit_block == _window(domain, "commit")[0]


# ---------------------------------------------------------------------------------------------
# 1. Commit binding


def test_reveal_whose_manifest_differs_from_the_revealed_digest_is_reveal_mismatch(domain, store, tmp_path):
    """The reveal names revision A but carries the manifest digest of checkpoint B."""
    sub_a = make_submission(
        domain, store, tmp_path / "a", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 1)
    )
    sub_b = make_submission(
        domain, store, tmp_path / "b", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 2)
    )
    commit, _ = _honest_records(domain, sub_a)
    reveal = reveal_record(
        HONEST, _window(domain, "reveal")[0], cycle=CYCLE, ref=sub_a.ref, manifest_sha=sub_b.manifest_sha
    )
    entry = _observe(domain, [commit, reveal])[CYCLE][HONEST]
    assert _rejection(domain, store, entry, tmp_path, hotkey=HONEST) == "reveal_mismatch"


def test_reveal_of_other_tensors_than_committed_is_commit_mismatch(domain, store, tmp_path):
    """Commit to checkpoint A, then reveal a self-consistent checkpoint B (e.g. trained longer)."""
    sub_a = make_submission(
        domain, store, tmp_path / "a", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 1)
    )
    sub_b = make_submission(
        domain, store, tmp_path / "b", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 2)
    )
    commit, _ = _honest_records(domain, sub_a)
    _, reveal = _honest_records(domain, sub_b)
    entry = _observe(domain, [commit, reveal])[CYCLE][HONEST]
    assert _rejection(domain, store, entry, tmp_path, hotkey=HONEST) == "commit_mismatch"


@pytest.mark.parametrize(
    ("reveals", "reason"), [("victim_checkpoint", "wrong_hotkey"), ("own_manifest", "commit_mismatch")]
)
def test_digest_copied_from_another_hotkey_matches_no_checkpoint_of_the_copier(
    domain, store, tmp_path, reveals, reason
):
    """The copier commits the victim's digest bytes; the digest binds the victim's hotkey, so
    neither the victim's checkpoint nor the same tensors under the copier's hotkey match it."""
    experts = _trained(domain)
    victim = make_submission(domain, store, tmp_path / "victim", hotkey=HONEST, cycle=CYCLE, experts=experts)
    if reveals == "victim_checkpoint":
        revealed = victim
    else:
        revealed = make_submission(
            domain, store, tmp_path / "copy", hotkey=COPIER, cycle=CYCLE, experts=experts
        )
    _, commit_last = _window(domain, "commit")
    records = [
        commit_record(COPIER, commit_last, cycle=CYCLE, digest=victim.digest),
        reveal_record(
            COPIER, commit_last + 1, cycle=CYCLE, ref=revealed.ref, manifest_sha=revealed.manifest_sha
        ),
    ]
    entry = _observe(domain, records)[CYCLE][COPIER]
    assert _rejection(domain, store, entry, tmp_path, hotkey=COPIER) == reason


@pytest.mark.parametrize("same_digest", [False, True])
def test_second_commit_in_one_cycle_is_double_commit(domain, same_digest):
    """Two commits in one cycle (hedging between checkpoints): the hotkey is rejected. The same
    digest again counts too: validators that saw different commit blocks would rank ties apart."""
    first, last = _window(domain, "commit")
    digest_a, digest_b = bytes(32), bytes([1]) * 32
    records = [
        commit_record(HONEST, first, cycle=CYCLE, digest=digest_a),
        commit_record(HONEST, last, cycle=CYCLE, digest=digest_a if same_digest else digest_b),
    ]
    entry = _observe(domain, records)[CYCLE][HONEST]
    assert precheck(entry)[0] == "double_commit"


def test_a_commit_seen_again_at_its_own_block_is_not_a_double_commit(domain):
    """Validators re-read the same chain record every block: that must not count as a second write."""
    first, _ = _window(domain, "commit")
    record = commit_record(HONEST, first, cycle=CYCLE, digest=bytes(32))
    entry = _observe(domain, [record, record, record])[CYCLE][HONEST]
    assert entry.commit_violation is None and entry.commit_block == first


def test_identical_payloads_earliest_commitment_wins_and_later_scores_zero(scorer):
    """Two hotkeys reveal bit-identical experts: the later commitment is a duplicate with no weight."""
    model, global_experts, domain_batches, general_batches, honest = scorer
    copy = {k: v.clone() for k, v in honest.items()}
    candidates = [_candidate("5Late", copy, block=13), _candidate("5Early", honest, block=12)]
    _, scores = _score(model, global_experts, candidates, domain_batches, general_batches)
    by_hotkey = {s.hotkey: s for s in scores}
    assert by_hotkey["5Early"].accepted
    assert by_hotkey["5Late"].reason == "duplicate" and by_hotkey["5Late"].utility == 0.0
    assert rank_weights(scores, ScoringConfig()) == {"5Early": 1.0}


# ---------------------------------------------------------------------------------------------
# 2. Deadlines


def _commit_at(domain: Domain, block: int) -> Observation:
    return _observe(domain, [commit_record(HONEST, block, cycle=CYCLE, digest=bytes(32))])[CYCLE][HONEST]


def _reveal_at(domain: Domain, store, tmp_path, block: int) -> Observation:
    sub = make_submission(domain, store, tmp_path / "r", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain))
    commit, _ = _honest_records(domain, sub)
    reveal = reveal_record(HONEST, block, cycle=CYCLE, ref=sub.ref, manifest_sha=sub.manifest_sha)
    return _observe(domain, [commit, reveal])[CYCLE][HONEST]


def test_commit_at_first_and_last_block_of_the_window_is_accepted(domain):
    first, last = _window(domain, "commit")
    for block in (first, last):
        entry = _commit_at(domain, block)
        assert entry.commit_violation is None and entry.commit_block == block


def test_commit_one_block_before_the_window_is_early_commit(domain):
    first, _ = _window(domain, "commit")
    assert precheck(_commit_at(domain, first - 1))[0] == "early_commit"


def test_commit_one_block_after_the_window_is_late_commit(domain):
    _, last = _window(domain, "commit")
    assert precheck(_commit_at(domain, last + 1))[0] == "late_commit"


def test_early_commit_is_not_cured_by_committing_again_inside_the_window(domain):
    first, _ = _window(domain, "commit")
    records = [commit_record(HONEST, b, cycle=CYCLE, digest=bytes(32)) for b in (first - 1, first)]
    assert precheck(_observe(domain, records)[CYCLE][HONEST])[0] == "early_commit"


def test_commit_counts_on_exactly_the_blocks_of_the_commit_phase(domain):
    """Every block of the cycle: a commit is in time iff ``phase(block)`` is the commit phase."""
    start = _window(domain, "train")[0]
    for block in range(start, start + domain.config.cycle.cycle_blocks):
        in_time = phase(block, domain.config.cycle).phase == "commit"
        assert (_commit_at(domain, block).commit_violation is None) == in_time, block


def test_reveal_at_first_and_last_block_of_the_reveal_window_is_accepted(domain, store, tmp_path):
    first, last = _window(domain, "reveal")
    for block in (first, last):
        entry = _reveal_at(domain, store, tmp_path, block)
        assert precheck(entry) is None and entry.reveal_block == block


@pytest.mark.parametrize("offset", [0, 1])
def test_reveal_before_the_commit_deadline_is_early_reveal(domain, store, tmp_path, offset):
    """At the deadline itself (offset 0) others may still commit, so the location must stay hidden."""
    deadline = _window(domain, "commit")[1]
    assert precheck(_reveal_at(domain, store, tmp_path, deadline - offset))[0] == "early_reveal"


def test_reveal_after_the_reveal_window_is_late_reveal(domain, store, tmp_path):
    _, last = _window(domain, "reveal")
    assert precheck(_reveal_at(domain, store, tmp_path, last + 1))[0] == "late_reveal"


def test_revision_uploaded_after_the_window_does_not_replace_the_pinned_reveal(domain, store, tmp_path):
    """After the reveal window the miner pushes a new revision to the same repo and reveals it.

    The in-window reveal pinned an exact revision, so validators still fetch that one; the late
    reveal is ignored; and the new content could never match the commit digest anyway.
    """
    repo = "miners/honest"
    old = make_submission(
        domain, store, tmp_path / "a", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 1), repo=repo
    )
    commit, reveal = _honest_records(domain, old)
    new = make_submission(
        domain, store, tmp_path / "b", hotkey=HONEST, cycle=CYCLE, experts=_trained(domain, 2), repo=repo
    )
    late = reveal_record(
        HONEST, _window(domain, "reveal")[1] + 1, cycle=CYCLE, ref=new.ref, manifest_sha=new.manifest_sha
    )
    entry = _observe(domain, [commit, reveal, late])[CYCLE][HONEST]
    assert entry.reveal_revision == old.ref.revision != new.ref.revision
    assert (
        _verify(domain, store, entry, tmp_path, hotkey=HONEST).tensors_sha256 == old.manifest.tensors_sha256
    )
    # revealing the new revision in time instead would still not match the commitment
    in_time = reveal_record(HONEST, reveal.block, cycle=CYCLE, ref=new.ref, manifest_sha=new.manifest_sha)
    entry = _observe(domain, [commit, in_time])[CYCLE][HONEST]
    assert _rejection(domain, store, entry, tmp_path, hotkey=HONEST) == "commit_mismatch"


@pytest.mark.parametrize("named_cycle", [0, CYCLE - 1, CYCLE + 1, 2**32 - 1])
def test_commitment_naming_another_cycle_than_its_block_is_ignored(domain, named_cycle):
    """A payload counts only for the cycle its block lies in: nobody can plant observations for
    other cycles (far-future cycle numbers would evict the real cycle from the validator's
    bounded history)."""
    first, _ = _window(domain, "commit")
    observed = _observe(domain, [commit_record(HONEST, first, cycle=named_cycle, digest=bytes(32))])
    assert observed == {}


def test_far_future_commitments_cannot_evict_the_current_cycle(domain, tmp_path):
    """End to end: an attacker commits payloads for cycles 10**6.. while an honest miner submits."""
    net = build_net(tmp_path, domain, miners=1, validators=1, extra=("attacker",))
    attacker = LocalChain.open(net.chain.path, wallet=net.keys["attacker"])
    net.nodes["attacker"] = _FarFutureCommitter(attacker)
    _, end = _window(domain, "evaluate", cycle=0)
    net.run_until(end)
    validator = net.nodes["v0"]
    rows = {row.hotkey: row for row in validator.state.results[0].scores}
    miner = net.keys["m0"].ss58_address
    assert miner in rows and rows[miner].accepted, rows.get(miner)
    assert all(cycle <= 0 for cycle in validator.state.observed)


class _FarFutureCommitter:
    """A registered hotkey that writes a commit for a far-future cycle at every block it can."""

    def __init__(self, chain: LocalChain) -> None:
        self.chain = chain

    def tick(self, block: int, info) -> None:
        self.chain.commit(encode_commitment(CommitPayload(cycle=10**6 + block, digest=bytes(32))))


# ---------------------------------------------------------------------------------------------
# 5. Copies and near-copies


@pytest.mark.parametrize("noise_share", [0.01, 0.05, 0.1])
def test_near_copy_with_small_noise_is_flagged_by_pseudo_gradient_cosine(scorer, noise_share):
    """Another miner's experts plus noise of ``noise_share`` of its pseudo-gradient's size."""
    model, global_experts, domain_batches, general_batches, honest = scorer
    generator = torch.Generator().manual_seed(3)
    noisy = {}
    for key, value in honest.items():
        delta = value - global_experts[key]
        noise = torch.randn(delta.shape, generator=generator)
        noisy[key] = value + noise_share * delta.norm() / noise.norm() * noise
    assert (
        cosine_similarity(pseudo_gradient(global_experts, honest), pseudo_gradient(global_experts, noisy))
        >= 0.99
    )
    candidates = [_candidate("5Orig", honest, block=12), _candidate("5Copy", noisy, block=13)]
    _, scores = _score(model, global_experts, candidates, domain_batches, general_batches)
    assert [(s.hotkey, s.reason) for s in scores] == [("5Orig", None), ("5Copy", "duplicate")]
    assert "hotkey=5Orig" in scores[1].detail


def test_scaled_pseudo_gradient_copy_is_flagged(scorer):
    """Extrapolating another miner's update (1.5x its pseudo-gradient) keeps cosine 1."""
    model, global_experts, domain_batches, general_batches, honest = scorer
    scaled = {k: global_experts[k] + 1.5 * (v - global_experts[k]) for k, v in honest.items()}
    candidates = [_candidate("5Orig", honest, block=12), _candidate("5Copy", scaled, block=13)]
    _, scores = _score(model, global_experts, candidates, domain_batches, general_batches)
    assert [s.reason for s in scores] == [None, "duplicate"]


def test_copy_tie_at_the_same_commit_block_goes_to_the_lexically_first_hotkey(scorer):
    """Same block, same tensors: the lexically smallest hotkey keeps its submission, whatever the
    order in which candidates arrive (every validator must agree)."""
    model, global_experts, domain_batches, general_batches, honest = scorer
    hotkeys = sorted(hotkey_of(name) for name in ("a", "b", "c"))
    for order in (hotkeys[::-1], [hotkeys[1], hotkeys[0], hotkeys[2]]):
        candidates = [_candidate(h, {k: v.clone() for k, v in honest.items()}, block=12) for h in order]
        _, scores = _score(model, global_experts, candidates, domain_batches, general_batches)
        accepted = [s.hotkey for s in scores if s.accepted]
        assert accepted == [hotkeys[0]], order


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(6)), st.integers(min_value=1, max_value=4))
def test_ranking_is_independent_of_input_order_and_breaks_ties_by_block_then_hotkey(order, top_k):
    """Equal losses rank by earlier commitment, then lexical hotkey order."""
    scores = [
        _s("5Dd", 1.0, block=5),
        _s("5Cc", 1.0, block=5),
        _s("5Bb", 1.0, block=4),
        _s("5Aa", 2.0, block=1),
        _s("5Ee", 0.5, block=9),
        _s("5Ff", 0.5, block=9, accepted=False),
    ]
    shuffled = [scores[i] for i in order]
    assert [s.hotkey for s in ranked(shuffled)] == ["5Ee", "5Bb", "5Cc", "5Dd", "5Aa"]
    assert rank_weights(shuffled, ScoringConfig(top_k=top_k)) == rank_weights(
        scores, ScoringConfig(top_k=top_k)
    )


def test_ema_of_a_deregistered_hotkey_is_cleared_and_its_uid_inherits_nothing(domain, tmp_path):
    """A miner with history leaves; a newcomer registers on its uid: the newcomer starts at zero."""
    net = build_net(tmp_path, domain, miners=2, validators=1)
    validator = net.nodes["v0"]
    leaver, stayer = net.keys["m0"].ss58_address, net.keys["m1"].ss58_address
    validator.state.ema = {leaver: 1.0, stayer: 1.0}
    uid = net.chain.deregister(leaver)
    newcomer = hotkey_of("newcomer")
    assert net.chain.register(newcomer, uid=uid) == uid
    net.chain.advance_blocks(_window(domain, "evaluate", cycle=0)[0])
    validator.evaluate(0)
    result = validator.state.results[0]
    assert set(validator.state.ema) == {stayer}
    assert uid not in result.weights and result.weights == {_uid(net, stayer): pytest.approx(1.0)}


def test_ema_of_a_reregistered_hotkey_starts_from_zero(domain, tmp_path):
    net = build_net(tmp_path, domain, miners=2, validators=1)
    validator = net.nodes["v0"]
    returner = net.keys["m0"].ss58_address
    validator.state.ema = {returner: 1.0}
    validator.state.registered_at = {returner: 0}  # earned under its genesis registration
    net.chain.advance_blocks(1)
    net.chain.deregister(returner)
    net.chain.register(returner)
    net.chain.advance_blocks(_window(domain, "evaluate", cycle=0)[0] - 1)
    validator.evaluate(0)
    assert returner not in validator.state.ema


def test_ema_survives_evaluations_while_the_registration_is_unchanged(domain, tmp_path):
    """The reset keys on the registration block, not on every evaluation: a hotkey that stays
    registered keeps its EMA blended, not zeroed."""
    net = build_net(tmp_path, domain, miners=2, validators=1)
    validator = net.nodes["v0"]
    stayer = net.keys["m0"].ss58_address
    net.chain.advance_blocks(_window(domain, "evaluate", cycle=0)[0])
    validator.evaluate(0)
    validator.state.ema[stayer] = 1.0
    net.chain.advance_blocks(_window(domain, "evaluate", cycle=1)[0] - net.chain.current_block())
    validator.evaluate(1)
    assert validator.state.ema[stayer] == pytest.approx(1 - domain.config.scoring.ema_alpha)


# ---------------------------------------------------------------------------------------------
# 6. Replay and staleness


def test_previous_cycle_checkpoint_replayed_is_wrong_cycle(domain, store, tmp_path):
    """Last cycle's checkpoint, re-committed (its own digest) and re-revealed in this cycle."""
    old = make_submission(
        domain, store, tmp_path / "old", hotkey=HONEST, cycle=CYCLE - 1, experts=_trained(domain)
    )
    entry = _observe(domain, _honest_records(domain, old, cycle=CYCLE))[CYCLE][HONEST]
    assert _rejection(domain, store, entry, tmp_path, hotkey=HONEST) == "wrong_cycle"


def test_previous_cycle_commitment_replayed_is_no_submission(domain):
    """The bytes of last cycle's commit, written again during this cycle's commit phase."""
    first, _ = _window(domain, "commit")
    observed = _observe(domain, [commit_record(HONEST, first, cycle=CYCLE - 1, digest=bytes(32))])
    assert HONEST not in observed.get(CYCLE, {})


def test_checkpoint_trained_from_an_old_global_revision_is_stale(domain, store, tmp_path):
    old_revision = "0" * 64
    sub = make_submission(
        domain,
        store,
        tmp_path / "s",
        hotkey=HONEST,
        cycle=CYCLE,
        experts=_trained(domain),
        global_revision=old_revision,
    )
    entry = _observe(domain, _honest_records(domain, sub))[CYCLE][HONEST]
    assert _rejection(domain, store, entry, tmp_path, hotkey=HONEST) == "stale"


def test_undeclared_stale_submission_reverting_the_last_merge_earns_nothing(scorer):
    """A miner that trained from the previous global but claims the current revision passes the
    gate; Proof-of-Loss then measures it against the current global, where undoing the last
    merge is a loss, not a gain."""
    model, previous_global, domain_batches, general_batches, improved = scorer
    write_experts(model, improved)  # the last merge moved the global to ``improved``
    try:
        lazy_old = perturbed(previous_global, seed=9, scale=1e-4)  # "trained" a little from the old one
        _, [score] = _score(
            model, improved, [_candidate("5Stale", lazy_old, block=12)], domain_batches, general_batches
        )
    finally:
        write_experts(model, previous_global)
    assert score.reason == "no_improvement" and score.utility == 0.0
    assert rank_weights([score], ScoringConfig()) == {}


# ---------------------------------------------------------------------------------------------
# 7. Lazy work


def test_global_experts_reuploaded_are_lazy_and_earn_no_weight(scorer):
    model, global_experts, domain_batches, general_batches, _honest = scorer
    same = {k: v.clone() for k, v in global_experts.items()}
    _, [score] = _score(
        model, global_experts, [_candidate("5Lazy", same, block=12)], domain_batches, general_batches
    )
    assert score.reason == "lazy" and rank_weights([score], ScoringConfig()) == {}


@pytest.mark.parametrize("scale", [1e-4, 1e-2])
def test_small_norm_noise_on_the_global_experts_earns_no_weight(scorer, scale):
    """Random noise dodges the zero-delta check; its loss change is rounding or a first-order
    accident of a few ppm. Six seeds per scale: none may be accepted, the honest miner takes
    all the weight."""
    model, global_experts, domain_batches, general_batches, honest = scorer
    noisy = [
        _candidate(f"5Noise{seed}", perturbed(global_experts, seed=seed, scale=scale), block=12)
        for seed in range(6)
    ]
    candidates = [_candidate("5Honest", honest, block=13), *noisy]
    _, scores = _score(model, global_experts, candidates, domain_batches, general_batches)
    assert {s.hotkey: s.reason for s in scores if s.hotkey != "5Honest"} == {
        c.hotkey: "no_improvement" for c in noisy
    }
    assert rank_weights(scores, ScoringConfig(top_k=16)) == {"5Honest": 1.0}


# ---------------------------------------------------------------------------------------------
# 9. Weights


def test_single_miner_gets_all_the_weight():
    weights = rank_weights([_s("5Only", 1.0)], ScoringConfig(top_k=8))
    assert weights == {"5Only": 1.0}
    assert chain_weights(
        update_ema({}, weights, alpha=0.5, registered={"5Only"}), {"5Only": 3}, burn_share=0.0, owner_uid=None
    ) == {3: pytest.approx(1.0)}


@pytest.mark.parametrize("rank_weighting", ["linear", "exponential", "winner_take_all"])
def test_only_the_top_k_of_more_miners_are_rewarded(rank_weighting):
    scores = [_s(f"5M{i}", loss=1.0 + i) for i in range(7)]
    weights = rank_weights(scores, ScoringConfig(top_k=3, rank_weighting=rank_weighting))
    assert set(weights) <= {"5M0", "5M1", "5M2"} and "5M0" in weights
    assert sum(weights.values()) == pytest.approx(1.0)
    assert list(weights.values()) == sorted(weights.values(), reverse=True)


def test_nan_scores_never_reach_the_weights():
    """A non-finite loss or EMA entry (corrupt state, a bug upstream) is dropped, never ranked."""
    scores = [_s("5Nan", float("nan"), block=1), _s("5Good", 1.0, block=2), _s("5Inf", float("inf"), block=3)]
    for order in itertools.permutations(scores):
        assert rank_weights(list(order), ScoringConfig(top_k=3)) == {"5Good": 1.0}
    ema = {"5Nan": float("nan"), "5Good": 0.5, "5Zero": 0.0, "5Neg": -1.0}
    uids = {"5Nan": 1, "5Good": 2, "5Zero": 3, "5Neg": 4}
    assert chain_weights(ema, uids, burn_share=0.0, owner_uid=None) == {2: pytest.approx(1.0)}


def test_all_zero_scores_give_no_weights_or_only_the_burn():
    assert rank_weights([_s("5A", 1.0, accepted=False)], ScoringConfig()) == {}
    assert chain_weights({"5A": 0.0}, {"5A": 1}, burn_share=0.0, owner_uid=None) == {}
    assert chain_weights({"5A": 0.0}, {"5A": 1}, burn_share=0.1, owner_uid=0) == {0: 1.0}


def test_validator_with_nothing_to_reward_sends_no_weight_transaction(domain, tmp_path):
    net = build_net(tmp_path, domain, miners=1, validators=1)
    validator = _with_chain(net, FlakyChain(inner=net.nodes["v0"].ctx.chain, failures=0))
    validator.state.results[0] = CycleResult(cycle=0, decision="none")
    _tick_at(net, validator, _window(domain, "evaluate", cycle=0)[0])
    assert validator.ctx.chain.attempts == [] and net.chain.weights() == {}


def test_rate_limited_weights_are_retried_next_block(domain, tmp_path):
    """Weights of cycle 1 come one block too soon after cycle 0's: refused, then set next block."""
    cycle_blocks = domain.config.cycle.cycle_blocks
    net = build_net(tmp_path, domain, miners=1, validators=1, weights_rate_limit=cycle_blocks + 1)
    validator = net.nodes["v0"]
    miner_uid = _uid(net, net.keys["m0"].ss58_address)
    validator.state.ema = {net.keys["m0"].ss58_address: 1.0}  # what evaluate left behind
    for cycle in (0, 1):
        validator.state.results[cycle] = CycleResult(cycle=cycle, decision="none", weights={miner_uid: 1.0})
    first0 = _window(domain, "evaluate", cycle=0)[0]
    first1 = _window(domain, "evaluate", cycle=1)[0]
    _tick_at(net, validator, first0)
    assert validator.state.results[0].weights_set_block == first0
    _tick_at(net, validator, first1)
    assert first1 - first0 < cycle_blocks + 1 and validator.state.results[1].weights_set_block is None
    _tick_at(net, validator, first1 + 1)
    assert validator.state.results[1].weights_set_block == first1 + 1
    assert net.chain.weights()[_uid(net, net.keys["v0"].ss58_address)] == {miner_uid: 1.0}


def test_failed_weight_transaction_is_retried_next_block(domain, tmp_path):
    net = build_net(tmp_path, domain, miners=1, validators=1)
    validator = _with_chain(net, FlakyChain(inner=net.nodes["v0"].ctx.chain, failures=1))
    miner_uid = _uid(net, net.keys["m0"].ss58_address)
    validator.state.ema = {net.keys["m0"].ss58_address: 1.0}  # what evaluate left behind
    validator.state.results[0] = CycleResult(cycle=0, decision="none", weights={miner_uid: 1.0})
    first = _window(domain, "evaluate", cycle=0)[0]
    _tick_at(net, validator, first)
    assert validator.state.results[0].weights_set_block is None and net.chain.weights() == {}
    _tick_at(net, validator, first + 1)
    assert validator.ctx.chain.attempts == [first, first + 1]
    assert validator.state.results[0].weights_set_block == first + 1
    assert net.chain.weights() == {_uid(net, validator.ctx.hotkey): {miner_uid: 1.0}}


def test_weights_skip_a_uid_deregistered_after_evaluation(domain, tmp_path):
    net = build_net(tmp_path, domain, miners=2, validators=1)
    validator = net.nodes["v0"]
    leaver, stayer = net.keys["m0"].ss58_address, net.keys["m1"].ss58_address
    validator.state.ema = {leaver: 0.5, stayer: 0.5}
    weights = {_uid(net, leaver): 0.5, _uid(net, stayer): 0.5}
    validator.state.results[0] = CycleResult(cycle=0, decision="none", weights=weights)
    net.chain.deregister(leaver)
    first = _window(domain, "evaluate", cycle=0)[0]
    _tick_at(net, validator, first)
    assert validator.state.results[0].weights_set_block == first
    assert net.chain.weights()[_uid(net, validator.ctx.hotkey)] == {_uid(net, stayer): 1.0}


def test_weights_of_a_replaced_hotkey_do_not_go_to_its_successor(domain, tmp_path):
    net = build_net(tmp_path, domain, miners=2, validators=1)
    validator = net.nodes["v0"]
    leaver, stayer = net.keys["m0"].ss58_address, net.keys["m1"].ss58_address
    validator.state.ema = {leaver: 0.5, stayer: 0.5}
    uid = _uid(net, leaver)
    validator.state.results[0] = CycleResult(
        cycle=0, decision="none", weights={uid: 0.5, _uid(net, stayer): 0.5}
    )
    net.chain.deregister(leaver)
    net.chain.register(hotkey_of("successor"), uid=uid)
    _tick_at(net, validator, _window(domain, "evaluate", cycle=0)[0])
    assert uid not in net.chain.weights().get(_uid(net, validator.ctx.hotkey), {})


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def scorer(domain):
    """(model holding the global experts, global experts, domain batches, general batches, an
    honest candidate trained on the domain batches). Shared: every scoring call hands the model
    back holding exactly the global experts."""
    config = domain.config
    model = load_model(domain.base_dir, config.model)
    write_experts(model, domain.global_experts)
    domain_batches = domain.data.heldout_sample(
        11, config.scoring.eval_batches, config.scoring.eval_batch_size
    )
    general_batches = domain.data.general_sample(
        11, config.scoring.general_batches, config.scoring.eval_batch_size
    )
    honest = _descended(model, domain, domain_batches)
    return model, domain.global_experts, domain_batches, general_batches, honest


def _descended(
    model, domain: Domain, batches, *, steps: int = 3, lr: float = 0.01
) -> dict[str, torch.Tensor]:
    """The selected experts after a few Adam steps on ``batches`` (a miner's inner loop in
    miniature); ``model`` is left unchanged."""
    params = [p for layer in moe_layers(model) for p in (layer.experts.gate_up_proj, layer.experts.down_proj)]
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(model(input_ids=b, labels=b).loss for b in batches).backward()
        optimizer.step()
    stepped = read_experts(model, domain.selection.experts_by_layer)
    with torch.no_grad():
        for p, original in zip(params, saved, strict=True):
            p.copy_(original)
            p.grad = None
    return stepped


def _candidate(hotkey: str, state: dict[str, torch.Tensor], *, block: int) -> Candidate:
    from connito.protocol.checkpoint import tensors_digest

    return Candidate(
        hotkey=hotkey, uid=0, commit_block=block, tensors_sha256=tensors_digest(state), state=state
    )


def _score(model, global_experts, candidates, domain_batches, general_batches, **overrides):
    config = ScoringConfig(**{"general_tolerance": 0.5, **overrides})
    return score_submissions(
        model,
        global_experts,
        candidates,
        domain_batches=domain_batches,
        general_batches=general_batches,
        config=config,
    )


def _s(hotkey: str, loss: float, *, block: int = 0, accepted: bool = True) -> SubmissionScore:
    return SubmissionScore(hotkey=hotkey, uid=0, commit_block=block, accepted=accepted, domain_loss=loss)


def _uid(net, hotkey: str) -> int:
    return next(n.uid for n in net.chain.metagraph() if n.hotkey == hotkey)


def _with_chain(net, chain):
    """Swap the first validator's chain for a fault-injecting wrapper around the same ledger."""
    from dataclasses import replace

    from connito.node.validator import Validator

    validator = Validator(replace(net.nodes["v0"].ctx, chain=chain))
    net.nodes["v0"] = validator
    return validator


def _tick_at(net, validator, block: int) -> None:
    """Advance the manual clock to ``block`` and tick the validator there once."""
    current = net.chain.current_block()
    assert block >= current, (block, current)
    net.chain.advance_blocks(block - current)
    validator.tick(block, phase(block, net.config.cycle))
