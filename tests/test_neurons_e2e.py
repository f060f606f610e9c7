"""Miners and validators end to end in one process: commit, reveal, score, weights, merge, adopt."""

from __future__ import annotations

from e2e_harness import build_subnet, domain_config

from connito.protocol.phases import phase_bounds


def test_two_cycles_merge_and_adopt(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=2)
    _, end = phase_bounds(1, "merge", config.cycle)
    subnet.run_until(end)
    lead, other = subnet.nodes["v0"], subnet.nodes["v1"]
    for cycle in (0, 1):
        result = lead.state.results[cycle]
        assert len(result.scores) == 2, result
        accepted = [row for row in result.scores if row.accepted]
        assert accepted, [(r.hotkey[:6], r.reason, r.detail) for r in result.scores]
        assert result.decision in ("merged", "best_single")
        assert result.weights_set_block is not None
    # the second validator recomputed and adopted the lead's global state
    assert other.global_state.revision == lead.global_state.revision
    assert other.state.results[0].decision == "adopted"
    # miners trained cycle 1 from the cycle-0 global
    miner = subnet.nodes["m0"]
    assert miner.progress.cycle == 1
    assert miner.progress.global_revision == lead.state.results[0].result_revision
    weights = subnet.chain.weights()
    assert set(weights) == {0, 1}


def test_every_adversary_is_rejected_with_its_own_reason(tmp_path):
    config = domain_config()
    subnet = build_subnet(
        tmp_path, config, miners=2, validators=1, adversaries=("copy", "nan", "lazy", "stale")
    )
    _, end = phase_bounds(1, "merge", config.cycle)
    subnet.run_until(end)
    lead = subnet.nodes["v0"]
    names = {key.ss58_address: name for name, key in subnet.keys.items()}
    expected = {"adv-copy": "duplicate", "adv-nan": "non_finite", "adv-lazy": "lazy", "adv-stale": "stale"}
    for cycle in (0, 1):
        reasons = {names[row.hotkey]: row.reason for row in lead.state.results[cycle].scores}
        assert {name: reasons.get(name) for name in expected} == expected, reasons
        assert reasons["m0"] is None and reasons["m1"] is None
        weights = lead.state.results[cycle].weights
        uids = {n.hotkey: n.uid for n in subnet.chain.metagraph()}
        assert all(weights.get(uids[subnet.keys[name].ss58_address], 0.0) == 0.0 for name in expected)
        assert weights.get(uids[subnet.keys["m0"].ss58_address], 0.0) > 0.0
