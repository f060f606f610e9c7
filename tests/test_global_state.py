"""Which publication a miner or validator adopts (``protocol.publication.chosen_publication``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bittensor.sp_core import Keypair

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import CycleConfig
from connito.protocol.commitments import GlobalPayload, encode_commitment
from connito.protocol.phases import phase_bounds
from connito.protocol.publication import (
    chosen_publication,
    failover_block,
    publication_of_cycle,
    publisher_history,
)

CYCLE = CycleConfig(train_blocks=4, commit_blocks=2, reveal_blocks=4, evaluate_blocks=2, merge_blocks=4)
LEAD, STAND_IN = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
OUTSIDER = Keypair.create_from_uri("//Charlie")  # a validator with a permit but third by stake


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """Alice leads, Bob stands in, Charlie has a permit but no publishing rank; blocks move by hand."""
    path = tmp_path / "chain.sqlite"
    LocalChain.genesis(
        path,
        netuid=1,
        seed=0,
        neurons=[
            GenesisNeuron(hotkey=LEAD.ss58_address, stake=100.0, validator_permit=True),
            GenesisNeuron(hotkey=STAND_IN.ss58_address, stake=10.0, validator_permit=True),
            GenesisNeuron(hotkey=OUTSIDER.ss58_address, stake=5.0, validator_permit=True),
        ],
        weights_rate_limit=0,
        commitment_rate_limit=0,
    )
    return path


def _publish(path: Path, cycle: int, *, at: int, key: Keypair = LEAD, revision: str = "ab" * 32) -> None:
    chain = LocalChain.open(path, wallet=key)
    chain.advance_blocks(at - chain.current_block())
    payload = GlobalPayload(
        cycle=cycle, store_kind="local", repo="v/global", revision=revision, record_digest=b"\1" * 16
    )
    chain.commit(encode_commitment(payload))


def test_the_leads_publication_inside_its_window_is_adopted(ledger: Path) -> None:
    first, _ = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=first)
    found = chosen_publication(LocalChain.open(ledger), CYCLE, newer_than=-1, before=1)
    assert found is not None and found.hotkey == LEAD.ss58_address and found.rank == 0


def test_a_publication_after_the_merge_phase_is_ignored(ledger: Path) -> None:
    _, last = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=last + 1, key=STAND_IN)
    chain = LocalChain.open(ledger)
    assert chosen_publication(chain, CYCLE, newer_than=-1, before=1) is None
    assert publication_of_cycle(chain, CYCLE, 0) is None


def test_only_newer_and_earlier_cycles_than_asked_are_adopted(ledger: Path) -> None:
    first, _ = phase_bounds(1, "merge", CYCLE)
    _publish(ledger, 1, at=first)
    chain = LocalChain.open(ledger)
    assert chosen_publication(chain, CYCLE, newer_than=1, before=3) is None  # already held
    assert chosen_publication(chain, CYCLE, newer_than=0, before=1) is None  # from the future
    assert chosen_publication(chain, CYCLE, newer_than=0, before=2) is not None


def test_a_validator_without_a_publishing_rank_never_counts(ledger: Path) -> None:
    first, _ = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=first, key=OUTSIDER)
    chain = LocalChain.open(ledger)
    assert chosen_publication(chain, CYCLE, newer_than=-1, before=1) is None
    assert publication_of_cycle(chain, CYCLE, 0, hotkey=OUTSIDER.ss58_address) is None


def test_a_stand_ins_own_publication_is_found_after_a_restart(ledger: Path) -> None:
    """A stand-in restarted after its commit must see it landed (and not publish the cycle twice)."""
    _publish(ledger, 0, at=failover_block(0, CYCLE), key=STAND_IN)
    chain = LocalChain.open(ledger)
    own = publication_of_cycle(chain, CYCLE, 0, hotkey=STAND_IN.ss58_address)
    assert own is not None and own.rank == 1 and own.block == failover_block(0, CYCLE)
    assert publication_of_cycle(chain, CYCLE, 0, hotkey=LEAD.ss58_address) is None
    assert publication_of_cycle(chain, CYCLE, 1, hotkey=STAND_IN.ss58_address) is None


def test_history_holds_each_cycles_chosen_publication_whoever_published(ledger: Path) -> None:
    """The library rebuild reads this: cycles published by the lead and by the stand-in alike."""
    _publish(ledger, 0, at=phase_bounds(0, "merge", CYCLE)[0], revision="a0" * 32)
    _publish(ledger, 1, at=failover_block(1, CYCLE), key=STAND_IN, revision="b1" * 32)
    _publish(ledger, 2, at=phase_bounds(2, "merge", CYCLE)[0], revision="a2" * 32)
    _publish(ledger, 2, at=failover_block(2, CYCLE), key=STAND_IN, revision="b2" * 32)  # too: lead's wins
    chain = LocalChain.open(ledger)

    history = publisher_history(chain.commitment_history, chain, CYCLE)

    assert [(p.payload.cycle, p.hotkey, p.payload.revision) for p in history] == [
        (0, LEAD.ss58_address, "a0" * 32),
        (1, STAND_IN.ss58_address, "b1" * 32),
        (2, LEAD.ss58_address, "a2" * 32),
    ]
