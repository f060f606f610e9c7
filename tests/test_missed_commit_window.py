"""A validator down or behind during the commit window penalises no one.

A reveal replaces a commit on chain, so a validator that comes back after the commit window sees
only reveals. It reads the commits back at the window's last block; where the chain cannot serve
that state, it skips the cycle (no rows, EMA unchanged) rather than mark honest miners no_commit.
"""

from __future__ import annotations

import dataclasses

import pytest
from e2e_harness import build_subnet, domain_config

from connito.errors import ChainError
from connito.node.context import guarded_tick
from connito.node.validator import Validator
from connito.protocol.phases import phase, phase_bounds


class _NoHistoryChain:
    """A chain node that serves only the present (a pruned node asked for an old block)."""

    def __init__(self, inner):
        self._inner = inner

    def commitments(self, block=None):
        if block is not None:
            raise ChainError(f"state at block {block} pruned")
        return self._inner.commitments()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _run(subnet, until: int, *, down: str | None = None, down_blocks: range = range(0)) -> None:
    """Tick every node up to ``until``; ``down`` misses every block in ``down_blocks``."""
    while (block := subnet.chain.current_block()) <= until:
        info = phase(block, subnet.config.cycle)
        for name, node in subnet.nodes.items():
            if name == down and block in down_blocks:
                continue
            guarded_tick(name, node.tick, block, info)
        subnet.chain.advance_blocks(1)


@pytest.mark.parametrize("chain_history", [True, False])
def test_a_validator_restarted_across_the_commit_window_penalises_no_one(tmp_path, chain_history):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=2)
    commit_first, _ = phase_bounds(1, "commit", config.cycle)
    _, reveal_last = phase_bounds(1, "reveal", config.cycle)
    _, merge_last = phase_bounds(1, "merge", config.cycle)
    _run(subnet, commit_first - 1)
    before = dict(subnet.nodes["v1"].state.ema)
    assert before, "cycle 0 should have paid the honest miners"
    # v1 goes down at the commit window and comes back, restarted, after the reveals replaced the commits
    _run(subnet, reveal_last, down="v1", down_blocks=range(commit_first, reveal_last + 1))
    ctx = subnet.nodes["v1"].ctx
    if not chain_history:
        ctx = dataclasses.replace(ctx, chain=_NoHistoryChain(ctx.chain))
    subnet.nodes["v1"] = Validator(ctx, progress_bars=False)
    _run(subnet, merge_last)
    result = subnet.nodes["v1"].state.results[1]
    if chain_history:
        reasons = {row.hotkey: row.reason for row in result.scores}
        assert len(reasons) == 2 and set(reasons.values()) == {None}, reasons
        lead = {row.hotkey: row.accepted for row in subnet.nodes["v0"].state.results[1].scores}
        assert {row.hotkey: row.accepted for row in result.scores} == lead
    else:
        assert result.skipped and not result.scores
        assert subnet.nodes["v1"].state.ema == before  # no one's weight was lowered
    assert all(row.reason != "no_commit" for row in result.scores)


def test_a_validator_that_watched_the_whole_window_needs_no_history(tmp_path):
    """History unreadable, but this process saw every commit live: it scores the cycle as usual."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=1, validators=1)
    validator = subnet.nodes["v0"]
    subnet.nodes["v0"] = Validator(
        dataclasses.replace(validator.ctx, chain=_NoHistoryChain(validator.ctx.chain)), progress_bars=False
    )
    _run(subnet, phase_bounds(0, "merge", config.cycle)[1])
    result = subnet.nodes["v0"].state.results[0]
    assert not result.skipped and [row.accepted for row in result.scores] == [True]
