"""Chains: where neurons read the metagraph and write commitments and weights.

``Chain`` is the seam; ``SubtensorChain`` (a subtensor node through the bittensor SDK) and
``LocalChain`` (an embedded ledger file, the offline default) implement it. Both are imported
lazily so that code needing only the protocol and its records never imports bittensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connito.chain.base import Chain, ChainParams, Commitment, Neuron, lead_validator

if TYPE_CHECKING:
    from connito.chain.local import LocalChain
    from connito.chain.subtensor import SubtensorChain

__all__ = [
    "Chain",
    "ChainParams",
    "Commitment",
    "LocalChain",
    "Neuron",
    "SubtensorChain",
    "lead_validator",
]


def __getattr__(name: str) -> Any:
    if name == "SubtensorChain":
        from connito.chain.subtensor import SubtensorChain

        return SubtensorChain
    if name == "LocalChain":
        from connito.chain.local import LocalChain

        return LocalChain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
