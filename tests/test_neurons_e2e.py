"""Miners and validators end to end in one process: commit, reveal, score, weights, merge, adopt."""

from __future__ import annotations

from e2e_harness import OWN_WORK, build_subnet, domain_config

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
    config = domain_config(**OWN_WORK)
    kinds = ("copy", "nan", "lazy", "stale", "sybil", "replay")
    subnet = build_subnet(tmp_path, config, miners=2, validators=1, adversaries=kinds)
    _, end = phase_bounds(1, "merge", config.cycle)
    subnet.run_until(end)
    lead = subnet.nodes["v0"]
    names = {key.ss58_address: name for name, key in subnet.keys.items()}
    expected = {
        "adv-copy": "duplicate",
        "adv-nan": "non_finite",
        "adv-lazy": "lazy",
        "adv-stale": "stale",
        "adv-sybil-0": "near_copy",  # 15% noise: under the cosine threshold, but m1's documents learned
        "adv-sybil-1": "near_copy",  # 50% noise
    }
    uids = {n.hotkey: n.uid for n in subnet.chain.metagraph()}
    for cycle in (0, 1):
        rows = {names[row.hotkey]: row for row in lead.state.results[cycle].scores}
        want = expected | ({"adv-replay": "replay"} if cycle else {})  # nothing to replay in cycle 0
        assert {name: getattr(rows.get(name), "reason", None) for name in want} == want, {
            n: (r.reason, r.detail[:80]) for n, r in rows.items()
        }
        assert rows["m0"].accepted and rows["m1"].accepted
        weights = lead.state.results[cycle].weights
        assert all(weights.get(uids[subnet.keys[name].ss58_address], 0.0) == 0.0 for name in want)
        assert weights.get(uids[subnet.keys["m0"].ss58_address], 0.0) > 0.0
        assert set(lead.state.results[cycle].merged) <= {subnet.keys[m].ss58_address for m in ("m0", "m1")}
    assert "cycle 0" in rows["adv-replay"].detail  # the victim's update of the last cycle
