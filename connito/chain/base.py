"""The narrow chain seam: what the neurons need from a blockchain, nothing more.

Two implementations: ``SubtensorChain`` (the real bittensor SDK) and ``LocalChain`` (an SQLite
ledger shared by processes on one machine). Neither imports torch; both move small records.
A chain object is bound to one subnet (netuid) and, for writes, one hotkey.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Neuron", "Commitment", "ChainParams", "Chain", "lead_validator"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Neuron:
    """One registered hotkey in the subnet's metagraph."""

    uid: int
    hotkey: str
    stake: float
    validator_permit: bool
    registered_block: int = 0  # when this hotkey took its uid: a new value means a new registration


@dataclass(frozen=True, slots=True, kw_only=True)
class Commitment:
    """The current commitment of one hotkey and the block it was written at.

    Like the real chain, a hotkey has one commitment per subnet; writing again replaces it.
    """

    hotkey: str
    block: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainParams:
    """Hyperparameters the neurons respect (all in blocks)."""

    tempo: int
    weights_rate_limit: int
    commitment_rate_limit: int
    # the subnet's minimum set_weights version_key (0: unchecked); the owner raises it to force an upgrade
    weights_version: int = 0


@runtime_checkable
class Chain(Protocol):
    """What miners and validators read from and write to a chain."""

    @property
    def hotkey(self) -> str | None:
        """ss58 of the hotkey this chain object writes as (None: read-only)."""
        ...

    def current_block(self) -> int:
        """The latest block number."""
        ...

    def block_hash(self, block: int) -> str:
        """Hex hash of a block at or below the current block.

        Raises:
            ChainError: the block is in the future or cannot be read.
        """
        ...

    def metagraph(self) -> list[Neuron]:
        """Every registered neuron of the subnet, ordered by uid."""
        ...

    def commit(self, data: bytes) -> int:
        """Write this hotkey's commitment (at most 128 bytes); returns the block it landed in.

        Raises:
            ChainError: rate limited, not registered, too long, or the chain refused it.
        """
        ...

    def commitments(self, block: int | None = None) -> list[Commitment]:
        """The commitment of every hotkey in the subnet that has one: now, or as it stood at ``block``.

        A reveal replaces a commit, so a validator that was down during the commit window reads
        the commits back at the window's last block.

        Raises:
            ChainError: the chain cannot serve state at ``block`` (pruned, or not yet produced).
        """
        ...

    def set_weights(self, weights: dict[int, float], *, version_key: int = 0) -> int:
        """Set this hotkey's weights over uids (normalised by the chain); returns the block.

        ``version_key`` is the sender's protocol version; the chain refuses it when it is below
        the subnet's ``weights_version`` (as subtensor's ``IncorrectWeightVersionKey`` does).

        Raises:
            ChainError: rate limited, no validator permit, an outdated version key, or refused.
        """
        ...

    def params(self) -> ChainParams:
        """The subnet hyperparameters the neurons need."""
        ...


def lead_validator(neurons: list[Neuron]) -> Neuron | None:
    """The validator that merges: highest stake among permitted neurons, ties to the lower uid."""
    permitted = [n for n in neurons if n.validator_permit]
    if not permitted:
        return None
    return min(permitted, key=lambda n: (-n.stake, n.uid))
