"""What a validator reads from the past: commitments at the window ends, and earlier cycles' updates.

A reveal replaces a commit on chain, so a validator that was down or behind during the commit
window would see no commit and mark honest miners ``no_commit``; it reads the commitments back as
they stood at the last block of the commit and of the reveal window instead (``LocalChain`` keeps
its history; subtensor serves past state). If the chain cannot serve that state and this process
was not watching the whole window, the cycle is skipped: no score rows, the EMA unchanged.

Accepted updates are kept as sketches (``connito.protocol.replay``) so that later cycles may not
replay them.

May import: the chain interface, the protocol, ``connito.node.context``.
"""

from __future__ import annotations

import logging
import statistics

from connito.errors import ChainError
from connito.node.context import NodeContext
from connito.node.validator_state import CycleResult
from connito.protocol.phases import phase_bounds
from connito.protocol.replay import ReplayHistory
from connito.protocol.scoring import SubmissionScore
from connito.protocol.submissions import Observation, observe_commitments

logger = logging.getLogger(__name__)

__all__ = ["observe_window_ends", "remember_accepted", "previous_step_norm"]


def observe_window_ends(
    ctx: NodeContext,
    observed: dict[int, dict[str, Observation]],
    cycle: int,
    *,
    watching_since: int | None,
) -> bool:
    """Fold into ``observed`` the commitments at the end of ``cycle``'s commit and reveal windows.

    Returns False when they cannot be read and this process started watching after the commit
    window opened (it may have missed commits): the caller skips the cycle rather than penalise.
    """
    config = ctx.config
    validators = {n.hotkey for n in ctx.chain.metagraph() if n.validator_permit}
    try:
        for window in ("commit", "reveal"):
            last = phase_bounds(cycle, window, config.cycle)[1]
            observe_commitments(observed, ctx.chain.commitments(block=last), config, ignore=validators)
    except ChainError as exc:
        first = phase_bounds(cycle, "commit", config.cycle)[0]
        logger.warning("cycle=%d commitments at the window ends unreadable: %s", cycle, exc)
        return watching_since is not None and watching_since < first
    return True


def remember_accepted(
    ctx: NodeContext, history: ReplayHistory, cycle: int, scores: list[SubmissionScore]
) -> None:
    """Keep sketches of ``cycle``'s accepted updates and forget cycles beyond the replay window.

    The sketch is the one the copy screen made of each kept update (``SubmissionScore.sketch``):
    the payload is not read again.
    """
    for score in scores:
        if score.accepted:
            assert score.sketch is not None, "score_submissions sketches every update it accepts"
            history.add_sketch(cycle, score.hotkey, score.sketch)
    history.prune(keep_from=cycle - ctx.config.scoring.replay_cycles)


def previous_step_norm(previous: CycleResult | None) -> float | None:
    """The step length this cycle is scored at: the median norm of last cycle's accepted updates.

    Fixed before any submission of this cycle is seen, so no submission can move it (a median of
    this cycle's norms would let a scaled update shift it). None when the last cycle has none.
    """
    norms = [r.update_norm for r in previous.scores if r.accepted and r.update_norm] if previous else []
    return statistics.median(norms) if norms else None
