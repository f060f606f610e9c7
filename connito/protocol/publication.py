"""Who publishes a cycle's global, and which publication every node adopts (lead failover).

If the lead validator is down during the merge phase, nobody publishes and the model stands
still. So the merge phase is split in two publication windows:

- rank 0 (the lead: most stake with a validator permit, ties to the lower uid) may publish in
  ``[merge_first, failover_block)`` (the whole phase when it is the only permit holder);
- rank 1 (the next validator in that order) may publish in ``[failover_block, merge_last]``,
  and only when no valid rank-0 publication of the cycle is on chain.

Both compute the same deterministic merge from the same public inputs (seeded evaluation of the
same revealed submissions, the same outer state carried in the adopted global), so a failover
publication is the merge the lead would have made. A publication counts only if its ``G``
commitment landed inside its publisher's window; a late lead publication is ignored. Nodes
choose the valid publication of the lowest rank, final once made (the windows do not overlap, so
a stand-in's exists only after the lead's window closed): every node sees the same commitments,
so every node adopts the same one, and at most one global per cycle is ever adopted.

May import: connito.chain.base, connito.config, connito.errors, connito.protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from connito.chain.base import Chain, Commitment, Neuron
from connito.config import CycleConfig
from connito.errors import CommitmentDecodeError
from connito.protocol.commitments import GlobalPayload, decode_commitment
from connito.protocol.phases import phase_bounds

__all__ = [
    "PUBLISHER_RANKS",
    "Publication",
    "publisher_ranks",
    "failover_block",
    "publication_window",
    "valid_publications",
    "chosen_publication",
    "publication_of_cycle",
    "publisher_history",
    "may_publish",
]

PUBLISHER_RANKS = 2  # the lead and one stand-in: enough for one failure, never a race of many


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """A valid ``G`` commitment: who published, at which block, with which rank, and what."""

    hotkey: str
    block: int
    rank: int
    payload: GlobalPayload


def publisher_ranks(neurons: list[Neuron]) -> dict[str, int]:
    """``{hotkey: rank}`` of the validators that may publish: permit holders by stake, then uid."""
    permitted = sorted((n for n in neurons if n.validator_permit), key=lambda n: (-n.stake, n.uid))
    return {n.hotkey: rank for rank, n in enumerate(permitted[:PUBLISHER_RANKS])}


def failover_block(cycle: int, cycle_config: CycleConfig) -> int:
    """The first block of the stand-in's window: the middle of the cycle's merge phase."""
    first, last = phase_bounds(cycle, "merge", cycle_config)
    return min(last, first + max(1, (last - first + 1) // 2))


def publication_window(
    rank: int, cycle: int, cycle_config: CycleConfig, *, publishers: int = PUBLISHER_RANKS
) -> tuple[int, int] | None:
    """The blocks (inclusive) in which a publisher of ``rank`` may publish ``cycle``'s global.

    With a single permitted validator (``publishers`` 1) there is no stand-in to hand over to,
    and the lead keeps the whole merge phase.
    """
    first, last = phase_bounds(cycle, "merge", cycle_config)
    middle = failover_block(cycle, cycle_config)
    if rank == 0:
        return (first, middle - 1) if publishers > 1 else (first, last)
    if rank == 1:
        return middle, last
    return None


def valid_publications(
    commitments: list[Commitment], ranks: dict[str, int], cycle_config: CycleConfig
) -> list[Publication]:
    """Every ``G`` commitment of a ranked publisher that landed inside its window, lowest rank first."""
    found = []
    for commitment in commitments:
        rank = ranks.get(commitment.hotkey)
        if rank is None:
            continue
        try:
            payload = decode_commitment(commitment.data)
        except CommitmentDecodeError:
            continue
        if not isinstance(payload, GlobalPayload):
            continue
        window = publication_window(rank, payload.cycle, cycle_config, publishers=len(ranks))
        if window is not None and window[0] <= commitment.block <= window[1]:
            found.append(
                Publication(hotkey=commitment.hotkey, block=commitment.block, rank=rank, payload=payload)
            )
    return sorted(found, key=lambda p: (p.rank, -p.payload.cycle))


def chosen_publication(
    chain: Chain, cycle_config: CycleConfig, *, newer_than: int, before: int
) -> Publication | None:
    """The publication a node adopts: the newest cycle's valid one of the lowest rank.

    The choice is final as soon as it is made: a valid lead publication has the lowest rank
    there is, and a stand-in's can only exist once the lead's window has closed (the windows do
    not overlap), so no lower-ranked publication can appear after it. The cycle must be after
    ``newer_than`` (the node's own global) and before ``before``.
    """
    publications = [
        p
        for p in valid_publications(chain.commitments(), publisher_ranks(chain.metagraph()), cycle_config)
        if newer_than < p.payload.cycle < before
    ]
    if not publications:
        return None
    newest = max(p.payload.cycle for p in publications)
    return min((p for p in publications if p.payload.cycle == newest), key=lambda p: p.rank)


def may_publish(chain: Chain, hotkey: str, *, block: int, cycle: int, cycle_config: CycleConfig) -> bool:
    """True when ``hotkey`` should merge and publish ``cycle``'s global at ``block``.

    The lead, inside its window; the stand-in, inside its window and only when no valid lead
    publication of ``cycle`` is on chain.
    """
    ranks = publisher_ranks(chain.metagraph())
    rank = ranks.get(hotkey)
    window = None if rank is None else publication_window(rank, cycle, cycle_config, publishers=len(ranks))
    if rank is None or window is None or not window[0] <= block <= window[1]:
        return False
    if rank == 0:
        return True
    earlier = valid_publications(chain.commitments(), ranks, cycle_config)
    return not any(p.payload.cycle == cycle and p.rank < rank for p in earlier)


def publication_of_cycle(
    chain: Chain, cycle_config: CycleConfig, cycle: int, *, hotkey: str | None = None
) -> Publication | None:
    """The valid publication of ``cycle`` still on chain (``hotkey``'s only, when given).

    Lowest rank first, as nodes choose. A restarted publisher asks for its own (did my commit
    land?), the library for the block of the global it records. A later commitment by the same
    hotkey replaces this one on a subtensor chain, so it answers for the current cycle only.
    """
    for publication in valid_publications(
        chain.commitments(), publisher_ranks(chain.metagraph()), cycle_config
    ):
        if publication.payload.cycle == cycle and (hotkey is None or publication.hotkey == hotkey):
            return publication
    return None


def publisher_history(
    history: Callable[[str], list[Commitment]], chain: Chain, cycle_config: CycleConfig
) -> list[Publication]:
    """Every cycle's chosen publication from the publishers' whole commitment ``history``, oldest first.

    Ranks are today's (the metagraph as it stands), so a cycle published by a validator that has
    since lost its rank is not found: the library's rebuild says so for the cycles it misses.
    """
    ranks = publisher_ranks(chain.metagraph())
    commitments = [c for hotkey in ranks for c in history(hotkey)]
    chosen: dict[int, Publication] = {}
    for publication in valid_publications(commitments, ranks, cycle_config):
        chosen.setdefault(publication.payload.cycle, publication)  # lowest rank first
    return [chosen[cycle] for cycle in sorted(chosen)]
