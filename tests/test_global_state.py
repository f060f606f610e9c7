"""Which lead publication a miner or validator adopts (``global_state.adoptable_global``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bittensor.sp_core import Keypair

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import CycleConfig
from connito.protocol.commitments import GlobalPayload, encode_commitment
from connito.protocol.global_state import adoptable_global
from connito.protocol.phases import phase_bounds

CYCLE = CycleConfig(train_blocks=4, commit_blocks=2, reveal_blocks=2, evaluate_blocks=2, merge_blocks=2)
LEAD, OTHER = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """Alice leads (most stake with a permit), Bob validates too; blocks move only by hand."""
    path = tmp_path / "chain.sqlite"
    LocalChain.genesis(
        path,
        netuid=1,
        seed=0,
        neurons=[
            GenesisNeuron(hotkey=LEAD.ss58_address, stake=100.0, validator_permit=True),
            GenesisNeuron(hotkey=OTHER.ss58_address, stake=10.0, validator_permit=True),
        ],
        weights_rate_limit=0,
        commitment_rate_limit=0,
    )
    return path


def _publish(path: Path, cycle: int, *, at: int, key: Keypair = LEAD) -> None:
    chain = LocalChain.open(path, wallet=key)
    chain.advance_blocks(at - chain.current_block())
    payload = GlobalPayload(
        cycle=cycle, store_kind="local", repo="v/lead", revision="ab" * 32, record_digest=b"\1" * 16
    )
    chain.commit(encode_commitment(payload))


def test_a_publication_inside_its_merge_phase_is_adopted_by_the_next_cycle(ledger: Path) -> None:
    first, last = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=last)
    found = adoptable_global(LocalChain.open(ledger), CYCLE, newer_than=-1, before=1)
    assert found is not None
    lead, payload = found
    assert lead == LEAD.ss58_address and payload.cycle == 0


def test_a_publication_after_its_merge_phase_is_ignored(ledger: Path) -> None:
    _, last = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=last + 1)
    assert adoptable_global(LocalChain.open(ledger), CYCLE, newer_than=-1, before=1) is None


def test_only_newer_and_earlier_cycles_than_asked_are_adopted(ledger: Path) -> None:
    _, last = phase_bounds(1, "merge", CYCLE)
    _publish(ledger, 1, at=last)
    chain = LocalChain.open(ledger)
    assert adoptable_global(chain, CYCLE, newer_than=1, before=3) is None  # already held
    assert adoptable_global(chain, CYCLE, newer_than=0, before=1) is None  # from the future
    assert adoptable_global(chain, CYCLE, newer_than=0, before=2) is not None


def test_only_the_lead_validators_publication_counts(ledger: Path) -> None:
    _, last = phase_bounds(0, "merge", CYCLE)
    _publish(ledger, 0, at=last, key=OTHER)
    assert adoptable_global(LocalChain.open(ledger), CYCLE, newer_than=-1, before=1) is None
