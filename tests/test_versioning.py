"""The versioned protocol: validators send it as the weights version_key, an outdated node stops.

The owner's upgrade lever is the subnet's ``weights_version`` hyperparameter. These tests raise
it on the embedded chain (as ``sudo_set_weights_version_key`` does on subtensor) and check that
the chain refuses an outdated key, that a validator's weights carry ``PROTOCOL_VERSION``, and that
a neuron's loop stops with one line at the next cycle instead of working for a subnet it no
longer matches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bittensor.sp_core import Keypair
from e2e_harness import domain_config

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.errors import ChainError, FatalNodeError
from connito.node.context import PhaseLoop
from connito.node.versioning import check_protocol_each_cycle, require_current_protocol
from connito.protocol.version import PROTOCOL_VERSION, is_outdated, upgrade_message

ALICE = Keypair.create_from_uri("//Alice")


def _chain(tmp_path: Path) -> LocalChain:
    LocalChain.genesis(
        tmp_path / "chain.sqlite",
        netuid=1,
        seed=3,
        neurons=[GenesisNeuron(hotkey=ALICE.ss58_address, stake=1.0, validator_permit=True)],
        weights_rate_limit=0,
    )
    return LocalChain.open(tmp_path / "chain.sqlite", wallet=ALICE)


def test_is_outdated_only_when_the_subnet_requires_a_newer_version() -> None:
    assert not is_outdated(0) and not is_outdated(PROTOCOL_VERSION)
    assert is_outdated(PROTOCOL_VERSION + 1)
    assert "upgrade connito" in upgrade_message(PROTOCOL_VERSION + 1)


def test_local_chain_refuses_weights_below_the_weights_version(tmp_path: Path) -> None:
    """Like subtensor's IncorrectWeightVersionKey: 0 accepts anything, then the key must keep up."""
    chain = _chain(tmp_path)
    assert chain.params().weights_version == 0
    chain.set_weights({0: 1.0})
    chain.set_weights_version(5)
    assert chain.params().weights_version == 5
    with pytest.raises(ChainError, match="IncorrectWeightVersionKey version_key=4 .* weights_version=5"):
        chain.set_weights({0: 1.0}, version_key=4)
    chain.set_weights({0: 1.0}, version_key=5)


def test_local_chain_weights_version_must_be_a_u64(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="weights_version: must be a u64, got -1"):
        _chain(tmp_path).set_weights_version(-1)


def test_outdated_node_stops_at_start_with_one_line(tmp_path: Path) -> None:
    chain = _chain(tmp_path)
    assert require_current_protocol(chain) == 0
    chain.set_weights_version(PROTOCOL_VERSION + 1)
    with pytest.raises(FatalNodeError) as info:
        require_current_protocol(chain)
    message = str(info.value)
    assert "\n" not in message and f"weights_version={PROTOCOL_VERSION + 1}" in message
    assert "upgrade" in message


def test_phase_loop_stops_at_the_first_cycle_after_the_owner_raises_the_version(tmp_path: Path) -> None:
    """The owner raises weights_version during cycle 0: the loop ends at cycle 1's first block."""
    chain = _chain(tmp_path)
    config = domain_config()
    ticks: list[int] = []

    def tick(block: int, info) -> None:
        ticks.append(block)
        if block == 3:
            chain.set_weights_version(PROTOCOL_VERSION + 1)

    loop = PhaseLoop(
        chain,
        config,
        poll_s=0.0,
        role="validator",
        sleep=lambda _s: chain.advance_blocks(1),
        on_cycle=lambda cycle: check_protocol_each_cycle(chain, "validator", cycle),
    )
    with pytest.raises(FatalNodeError, match="upgrade connito"):
        loop.run(tick, until_cycle=3)
    assert max(ticks) < config.cycle.cycle_blocks  # nothing ran in cycle 1


def test_unreadable_chain_skips_the_version_check(tmp_path: Path, caplog) -> None:
    """An outage is not an upgrade: the check logs one WARNING and the node goes on."""

    class Down:
        def params(self):
            raise ChainError("ws://x: connection refused")

    check_protocol_each_cycle(Down(), "miner", 4)  # type: ignore[arg-type]
    assert "protocol version check skipped" in caplog.text


def test_validator_sends_the_protocol_version_as_version_key(tmp_path: Path) -> None:
    """Weights set by a validator pass a chain that requires exactly PROTOCOL_VERSION."""
    from e2e_harness import build_subnet

    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=1, validators=1)
    LocalChain.open(tmp_path / "chain.sqlite").set_weights_version(PROTOCOL_VERSION)
    subnet.run_until(config.cycle.cycle_blocks + config.cycle.cycle_blocks - 1)
    assert subnet.chain.weights(), "no weights were accepted by the chain"
