"""Miners and validators end to end in one process: commit, reveal, score, weights, merge, adopt."""

from __future__ import annotations

from e2e_harness import build_subnet, domain_config

from connito.protocol import phase_bounds


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
