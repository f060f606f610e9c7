"""Stop a node that is older than the subnet, at start and at every new cycle.

The subnet owner raises ``weights_version`` to force an upgrade (``connito.protocol.version``).
A validator that kept running would have every ``set_weights`` refused on chain, and a miner
would train for validators that no longer score its format; both stop with one line instead.
A chain that cannot be read is not a reason to stop: the check runs again next cycle.
"""

from __future__ import annotations

import logging

from connito.chain.base import Chain
from connito.errors import ChainError, FatalNodeError
from connito.protocol.version import PROTOCOL_VERSION, is_outdated, upgrade_message

__all__ = ["require_current_protocol", "check_protocol_each_cycle"]

logger = logging.getLogger(__name__)


def require_current_protocol(chain: Chain, *, protocol_version: int = PROTOCOL_VERSION) -> int:
    """Read the subnet's ``weights_version``; returns it when this node may run.

    Raises:
        FatalNodeError: the subnet requires a newer protocol version than this node speaks.
        ChainError: the chain cannot be read.
    """
    weights_version = chain.params().weights_version
    if is_outdated(weights_version, protocol_version=protocol_version):
        raise FatalNodeError(upgrade_message(weights_version, protocol_version=protocol_version))
    return weights_version


def check_protocol_each_cycle(chain: Chain, role: str, cycle: int) -> None:
    """The per-cycle check: an unreadable chain logs one WARNING and is tried again next cycle.

    Raises:
        FatalNodeError: the subnet requires a newer protocol version than this node speaks.
    """
    try:
        weights_version = require_current_protocol(chain)
    except ChainError as exc:
        logger.warning("%s cycle=%d protocol version check skipped: %s", role, cycle, exc)
        return
    logger.debug(
        "%s cycle=%d weights_version=%d protocol_version=%d", role, cycle, weights_version, PROTOCOL_VERSION
    )
