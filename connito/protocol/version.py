"""The protocol version every node speaks, and the one rule that compares it with the chain's.

Validators send ``PROTOCOL_VERSION`` as the ``version_key`` of every ``set_weights``. The subnet
owner forces an upgrade by raising the subnet's ``weights_version`` hyperparameter to the new
release's ``PROTOCOL_VERSION``: subtensor then refuses weights from older validators
(``IncorrectWeightVersionKey``), and every connito node, miner or validator, reads the value at
start and every cycle and stops with one line instead of working for a subnet it no longer
matches. Bump it with every release that changes what nodes must agree on (commitment format,
scoring, merge); a release that changes nothing nodes agree on keeps it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PROTOCOL_VERSION", "is_outdated", "upgrade_message"]

PROTOCOL_VERSION: Final = 1


def is_outdated(weights_version: int, *, protocol_version: int = PROTOCOL_VERSION) -> bool:
    """True when the subnet requires a newer protocol than this node speaks (0: no requirement)."""
    return protocol_version < weights_version


def upgrade_message(weights_version: int, *, protocol_version: int = PROTOCOL_VERSION) -> str:
    """The one line an outdated node stops with."""
    return (
        f"subnet weights_version={weights_version} is newer than this connito's "
        f"protocol_version={protocol_version}: upgrade connito (pip install -U connito) and restart"
    )
