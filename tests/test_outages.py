"""Outages: the store or the chain down for a whole window. The cycle is skipped, nobody is
penalised, and every neuron recovers by itself when the service returns."""

from __future__ import annotations

import dataclasses

import pytest
from e2e_harness import build_subnet, domain_config

import connito.node.validator
from connito.errors import ChainError, StoreError
from connito.node.miner import Miner
from connito.node.validator import Validator
from connito.node.validator_downloads import prune_downloads
from connito.protocol.phases import phase_bounds


class _Switch:
    """Shared on/off state of an injected outage."""

    def __init__(self) -> None:
        self.down = False
        self.refused = 0


class _DownStore:
    """The store, unreachable while the switch is down (as a Hub outage looks to the client)."""

    def __init__(self, store, switch: _Switch) -> None:
        self._store, self._switch = store, switch

    def __getattr__(self, name):
        attribute = getattr(self._store, name)
        if name not in ("upload", "download") or not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self._switch.down:
                self._switch.refused += 1
                raise StoreError(f"{name}: connection refused (injected outage)", reason="unreachable")
            return attribute(*args, **kwargs)

        return call


class _DownChain:
    """The chain endpoint, refusing every call while the switch is down."""

    def __init__(self, chain, switch: _Switch) -> None:
        self._chain, self._switch = chain, switch

    def __getattr__(self, name):
        attribute = getattr(self._chain, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self._switch.down:
                self._switch.refused += 1
                raise ChainError(f"{name}: websocket closed (injected outage)", endpoint="ws://injected")
            return attribute(*args, **kwargs)

        return call


def _rewire(subnet, *, store_switch: _Switch | None = None, chain_switch: _Switch | None = None) -> None:
    """Rebuild every node on contexts whose store and/or chain go through the outage switch."""
    for name, node in list(subnet.nodes.items()):
        ctx = node.ctx
        if store_switch is not None:
            ctx = dataclasses.replace(ctx, store=_DownStore(ctx.store, store_switch))
        if chain_switch is not None:
            ctx = dataclasses.replace(ctx, chain=_DownChain(ctx.chain, chain_switch))
        subnet.nodes[name] = (
            Validator(ctx) if isinstance(node, Validator) else Miner(ctx, progress_bars=False)
        )


def _cycle_end(config, cycle: int) -> int:
    return phase_bounds(cycle, "merge", config.cycle)[1]


def test_store_down_for_a_whole_evaluate_window_skips_the_cycle_and_recovers(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    switch = _Switch()
    _rewire(subnet, store_switch=switch)
    evaluate_first, evaluate_last = phase_bounds(0, "evaluate", config.cycle)
    subnet.run_until(evaluate_first - 1)  # miners uploaded and revealed while the store was up
    validator = subnet.nodes["v0"]
    ema_before = dict(validator.state.ema)
    switch.down = True
    subnet.run_until(_cycle_end(config, 0))  # the store is down for evaluate and merge
    switch.down = False
    assert switch.refused > 0
    result = validator.state.results[0]
    assert result.skipped and result.decision == "none"
    assert result.scores == [] and result.cycle_weights == {}  # no rejection recorded against anyone
    assert validator.state.ema == ema_before
    assert validator.global_state.cycle == -1  # nothing merged from a cycle nobody could verify
    subnet.run_until(_cycle_end(config, 1))  # the store is back: cycle 1 runs normally
    recovered = validator.state.results[1]
    assert not recovered.skipped and [row.accepted for row in recovered.scores] == [True, True]
    assert recovered.decision in ("merged", "best_single")
    assert validator.global_state.cycle == 1


def test_chain_down_for_a_whole_cycle_penalises_nobody_and_neurons_recover(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    switch = _Switch()
    _rewire(subnet, chain_switch=switch)
    switch.down = True
    subnet.run_until(_cycle_end(config, 0))  # no node can read or write the chain in cycle 0
    switch.down = False
    assert switch.refused > 0
    validator = subnet.nodes["v0"]
    assert 0 not in validator.state.results or validator.state.results[0].scores == []
    assert validator.state.ema == {}
    assert subnet.chain.commitment_history() == []  # nothing was written during the outage
    subnet.run_until(_cycle_end(config, 1))  # the chain is back: cycle 1 runs normally
    result = validator.state.results[1]
    assert [row.accepted for row in result.scores] == [True, True], [
        (r.reason, r.detail) for r in result.scores
    ]
    assert result.decision in ("merged", "best_single") and validator.global_state.cycle == 1
    uids = {row.uid for row in result.scores}
    assert set(subnet.chain.weights()[0]) == uids  # both miners weighted, nobody docked for cycle 0


def test_validator_keeps_downloads_of_two_cycles_only(tmp_path):
    """Disk stays bounded: older submission and global downloads are deleted at evaluation."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    validator = subnet.nodes["v0"]
    root = validator.ctx.workdir / "downloads"
    for name in ("0", "1", "global-0", "global-1", "2", "global-2", "notes"):
        (root / name / "x").mkdir(parents=True)
    prune_downloads(validator.ctx, keep_from=1)
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "global-1", "global-2", "notes"]
    subnet.run_until(_cycle_end(config, 2))  # evaluations of cycles 0..2 prune as they go
    assert sorted(p.name for p in root.iterdir() if p.name[-1].isdigit()) == [
        "1",
        "2",
        "global-1",
        "global-2",
    ]


def test_general_drift_cap_is_the_base_loss_and_the_lead_publishes_nothing_above_it(tmp_path, monkeypatch):
    """The cap is the base experts' general loss on the cycle's own sample (x 1 + limit); a merge
    or best single above it is not published, whatever its domain loss."""
    config = domain_config(scoring__general_drift_limit=0.0)
    subnet = build_subnet(tmp_path / "measured", config, miners=2, validators=1)
    subnet.run_until(_cycle_end(config, 0))
    result = subnet.nodes["v0"].state.results[0]
    assert result.general_ceiling == pytest.approx(result.global_general_loss)  # cycle 0: global = base
    assert result.decision in ("merged", "best_single")  # the untrained base: training helps general too

    capped = build_subnet(tmp_path / "capped", config, miners=2, validators=1)
    lowered = connito.node.validator.general_ceiling
    monkeypatch.setattr(connito.node.validator, "general_ceiling", lambda *a, **k: 0.5 * lowered(*a, **k))
    capped.run_until(_cycle_end(config, 0))
    result = capped.nodes["v0"].state.results[0]
    assert [row.accepted for row in result.scores] == [True, True]  # the cap does not touch scoring
    assert result.decision == "none" and capped.nodes["v0"].global_state.cycle == -1
