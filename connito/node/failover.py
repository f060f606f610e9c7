"""The validator's side of lead failover: whether to publish now, and whether what it published counts.

The rules live in ``connito.protocol.publication``; this room applies them to a validator's
chain and logs its decisions, so the validator's merge phase stays two small call sites.
"""

from __future__ import annotations

import logging

from connito.node.context import NodeContext
from connito.protocol.publication import may_publish, publication_window, publisher_ranks

__all__ = ["should_publish", "publication_counts"]

logger = logging.getLogger(__name__)


def should_publish(ctx: NodeContext, *, block: int, cycle: int) -> bool:
    """True when this validator merges and publishes ``cycle`` at ``block`` (lead, or stand-in)."""
    return may_publish(ctx.chain, ctx.hotkey, block=block, cycle=cycle, cycle_config=ctx.config.cycle)


def publication_counts(ctx: NodeContext, *, cycle: int, block: int) -> bool:
    """True when our ``G`` commitment at ``block`` landed inside our publication window.

    A publication that landed late is ignored by every node (they adopt the stand-in's, or
    nothing); the publisher must not adopt it either, or it would hold a global nobody else has.
    """
    ranks = publisher_ranks(ctx.chain.metagraph())
    rank = ranks.get(ctx.hotkey)
    window = (
        None if rank is None else publication_window(rank, cycle, ctx.config.cycle, publishers=len(ranks))
    )
    if window is not None and window[0] <= block <= window[1]:
        if rank:
            logger.warning("cycle=%d phase=merge failover: published as rank=%d block=%d", cycle, rank, block)
        return True
    logger.warning(
        "cycle=%d phase=merge publication landed at block=%d outside this validator's window %s: not adopted",
        cycle,
        block,
        window,
    )
    return False
