"""Lead failover: when the lead has not published by the middle of the merge phase, the next
validator by stake publishes the same merge, and every node adopts exactly one global per cycle.
"""

from __future__ import annotations

import dataclasses

import pytest
from e2e_harness import build_subnet, domain_config

from connito.chain.base import Commitment, Neuron
from connito.node.validator import Validator
from connito.protocol.commitments import GlobalPayload, decode_commitment, encode_commitment
from connito.protocol.phases import phase_bounds
from connito.protocol.publication import (
    chosen_publication,
    failover_block,
    publication_window,
    publisher_ranks,
    valid_publications,
)

LEAD, STANDIN, THIRD = "5lead", "5standin", "5third"


def _g(cycle: int) -> bytes:
    payload = GlobalPayload(
        cycle=cycle, store_kind="local", repo="v/x", revision="a" * 64, record_digest=bytes(16)
    )
    return encode_commitment(payload)


def test_windows_split_the_merge_phase_without_overlap() -> None:
    config = domain_config(cycle__merge_blocks=6).cycle
    first, last = phase_bounds(3, "merge", config)
    assert failover_block(3, config) == first + 3
    assert publication_window(0, 3, config) == (first, first + 2)
    assert publication_window(1, 3, config) == (first + 3, last)
    assert publication_window(2, 3, config) is None
    assert publication_window(0, 3, config, publishers=1) == (first, last)  # no stand-in: the whole phase


def test_ranks_are_permit_holders_by_stake_then_uid() -> None:
    neurons = [
        Neuron(uid=0, hotkey=THIRD, stake=5.0, validator_permit=True),
        Neuron(uid=1, hotkey=STANDIN, stake=9.0, validator_permit=True),
        Neuron(uid=2, hotkey=LEAD, stake=9.0, validator_permit=False),
        Neuron(uid=3, hotkey=LEAD + "x", stake=10.0, validator_permit=True),
    ]
    assert publisher_ranks(neurons) == {LEAD + "x": 0, STANDIN: 1}


def test_a_publication_counts_only_inside_its_publishers_window() -> None:
    config = domain_config(cycle__merge_blocks=6).cycle
    first, _ = phase_bounds(0, "merge", config)
    ranks = {LEAD: 0, STANDIN: 1}
    late_lead = Commitment(hotkey=LEAD, block=first + 3, data=_g(0))
    early_standin = Commitment(hotkey=STANDIN, block=first + 2, data=_g(0))
    assert valid_publications([late_lead, early_standin], ranks, config) == []
    on_time = [
        Commitment(hotkey=LEAD, block=first + 2, data=_g(0)),
        Commitment(hotkey=STANDIN, block=first + 3, data=_g(0)),
    ]
    assert [p.hotkey for p in valid_publications(on_time, ranks, config)] == [LEAD, STANDIN]


class _Killed(BaseException):
    """The lead process dies (not an Exception: the neuron loop cannot catch it)."""


class _DiesOnGlobalCommit:
    """The lead's chain: it uploaded its global, then dies before the chain write lands."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def commit(self, data: bytes) -> int:
        if isinstance(decode_commitment(data), GlobalPayload):
            raise _Killed
        return self.inner.commit(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("when", ["before", "during"])
def test_standin_publishes_when_the_lead_dies(tmp_path, when: str) -> None:
    """The lead dies before (or in the middle of) its cycle-0 publication; the stand-in publishes
    at the failover block, and the third validator and every miner adopt that one global."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=3)
    merge_first, merge_last = phase_bounds(0, "merge", config.cycle)
    if when == "before":
        subnet.run_until(merge_first - 1)
        del subnet.nodes["v0"]
    else:
        lead = subnet.nodes["v0"]
        subnet.nodes["v0"] = Validator(
            dataclasses.replace(lead.ctx, chain=_DiesOnGlobalCommit(lead.ctx.chain))
        )
        with pytest.raises(_Killed):
            subnet.run_until(merge_last)
        del subnet.nodes["v0"]
    train_last = phase_bounds(1, "train", config.cycle)[1]
    subnet.run_until(train_last)

    chosen = chosen_publication(subnet.chain, config.cycle, newer_than=-1, before=1)
    standin, third = subnet.nodes["v1"], subnet.nodes["v2"]
    assert chosen is not None and chosen.hotkey == standin.ctx.hotkey and chosen.rank == 1
    assert chosen.block >= failover_block(0, config.cycle)
    assert standin.state.results[0].decision in ("merged", "best_single")
    assert third.global_state.cycle == 0 and third.global_state.revision == standin.global_state.revision
    for miner in ("m0", "m1"):
        assert subnet.nodes[miner].global_state.revision == standin.global_state.revision
    if when == "during":  # the dead lead's upload reached the store, yet nobody adopted it
        assert (tmp_path / "hub" / "nodes" / "v0").is_dir()


class _DiesAfterGlobalCommit(_DiesOnGlobalCommit):
    """The stand-in's chain: its global commitment lands, then the process dies before saving."""

    def commit(self, data: bytes) -> int:
        block = self.inner.commit(data)
        if isinstance(decode_commitment(data), GlobalPayload):
            raise _Killed
        return block


def test_a_restarted_standin_does_not_publish_the_cycle_twice(tmp_path) -> None:
    """The stand-in dies between its chain write and its state save; restarted inside its window,
    it finds its own publication on chain, adopts it, and commits nothing more."""
    config = domain_config(cycle__merge_blocks=6)
    subnet = build_subnet(tmp_path, config, miners=2, validators=3)
    merge_first, merge_last = phase_bounds(0, "merge", config.cycle)
    subnet.run_until(merge_first - 1)
    del subnet.nodes["v0"]  # the lead is down: the stand-in publishes
    standin = subnet.nodes["v1"]
    subnet.nodes["v1"] = Validator(
        dataclasses.replace(standin.ctx, chain=_DiesAfterGlobalCommit(standin.ctx.chain))
    )
    with pytest.raises(_Killed):
        subnet.run_until(merge_last)
    assert subnet.chain.current_block() < merge_last  # died inside its window, with time left
    subnet.nodes["v1"] = Validator(standin.ctx)  # restarted from its workdir
    subnet.run_until(phase_bounds(1, "train", config.cycle)[1])

    globals_committed = [
        c for c in subnet.chain.commitment_history(standin.ctx.hotkey)
        if isinstance(decode_commitment(c.data), GlobalPayload)
    ]  # fmt: skip
    assert len(globals_committed) == 1
    restarted = subnet.nodes["v1"]
    assert restarted.state.results[0].decision in ("merged", "best_single")
    assert restarted.global_state.cycle == 0
    assert subnet.nodes["v2"].global_state.revision == restarted.global_state.revision
