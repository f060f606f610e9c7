"""Pulling the lead's newest global state: the one step miners and validators share.

A node adopts only the publication ``chosen_publication`` names (newer than its own, from
before this cycle, of a cycle whose merge phase is over, the lead's or on failover the
stand-in's, committed inside its publisher's window), fetched from the store at its pinned
revision and checked by the strict loader. A failed fetch is one WARNING line: the node keeps
its global and tries again at the next block.

May import: the protocol (global state), ``connito.node.context`` and the node's start-up checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from connito.errors import InvalidSubmission, StoreError
from connito.node.context import NodeContext
from connito.node.startup_checks import recover_missing_global
from connito.node.validator_state import ValidatorState
from connito.protocol.global_state import GlobalState, expected_specs, fetch_global, load_global
from connito.protocol.publication import chosen_publication

logger = logging.getLogger(__name__)

__all__ = ["held_global", "pull_global"]

GLOBAL_SIZE_FACTOR = 4  # a global carries experts, outer master and momentum: a few payloads' bytes


def pull_global(
    ctx: NodeContext, current: GlobalState, *, before: int, folder: Callable[[int], Path]
) -> tuple[str, GlobalState] | None:
    """The lead's hotkey and its adoptable global from before cycle ``before``, or None.

    ``folder(cycle)`` is where the download lands. Nothing is adopted here: the caller decides
    (a validator recomputes the merge first).
    """
    found = chosen_publication(ctx.chain, ctx.config.cycle, newer_than=current.cycle, before=before)
    if found is None:
        return None
    lead, payload = found.hotkey, found.payload  # the lead's, or the stand-in's on failover
    try:
        fetched = fetch_global(
            ctx.store,
            lead,
            payload,
            folder(payload.cycle),
            selection=ctx.selection,
            expected=expected_specs(current),
            max_bytes=ctx.config.scoring.max_payload_bytes * GLOBAL_SIZE_FACTOR,
        )
    except (StoreError, InvalidSubmission) as exc:
        logger.warning("global fetch failed cycle=%d: %s", payload.cycle, exc)
        return None
    return lead, fetched


def held_global(ctx: NodeContext, state: ValidatorState, state_path: Path, base: GlobalState) -> GlobalState:
    """The global a validator held when it stopped: genesis (``base``) before any adoption, else
    the folder of ``state.global_cycle`` in its workdir, healed from chain and store when gone."""
    if state.global_cycle < 0:
        return base
    folder = ctx.workdir / "global" / str(state.global_cycle)
    if not folder.is_dir():  # heal from chain and store rather than fail every poll
        return recover_missing_global(state, folder, state_path, base)
    return load_global(
        folder,
        selection=ctx.selection,
        expected=expected_specs(base),
        max_bytes=2**40,
        cycle=state.global_cycle,
    )
