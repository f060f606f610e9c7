"""Which training documents a miner must train on in a cycle, and which are assigned to nobody.

Evidence of own work needs data that is the miner's own: each cycle every hotkey is assigned a
pseudo-random ``fraction`` of the training documents, decided per document from its shard key
and ``(domain, cycle, hotkey)``. A further ``fraction`` of the documents, decided from
``(domain, cycle)`` alone, is the cycle's control set: assigned to no miner, so the loss drop an
update shows there is what it learned about the domain in general. A miner that trained on its
assignment lowers the loss on it more than on the control set; a copy, a replay or an update
trained on anything else does not (``connito.protocol.own_work``).

Both are pure functions of public values, so a miner and every validator compute the same sets
with no chain read; knowing them early helps no one, because the test needs the training itself.

May import: numpy and the standard library.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["MIN_DOCUMENTS", "assignment_salt", "control_mask", "assigned_mask"]

MIN_DOCUMENTS = 4  # the smallest assignment or control set, whatever the fraction gives

_SPAN = float(2**64)
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def assignment_salt(*parts: object) -> np.uint64:
    """64 bits of ``sha256`` over ``parts``: the salt one assignment is drawn with."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()
    return np.uint64(int.from_bytes(digest[:8], "big"))


def _draw(keys: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A uniform 64-bit draw per key: splitmix64's finaliser of ``key ^ salt`` (vectorised)."""
    with np.errstate(over="ignore"):
        z = (keys.astype(np.uint64) ^ salt) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK


def control_mask(keys: np.ndarray, *, domain: str, cycle: int, fraction: float) -> np.ndarray:
    """True for the documents in ``cycle``'s control set (about ``fraction``, at least ``MIN_DOCUMENTS``)."""
    return _smallest(_draw(keys, assignment_salt("control", domain, cycle)), fraction)


def assigned_mask(keys: np.ndarray, *, domain: str, cycle: int, hotkey: str, fraction: float) -> np.ndarray:
    """True for the documents ``hotkey`` must train on in ``cycle`` (about ``fraction``, at least
    ``MIN_DOCUMENTS``; never a control document)."""
    control = control_mask(keys, domain=domain, cycle=cycle, fraction=fraction)
    draws = _draw(keys, assignment_salt("assign", domain, cycle, hotkey))
    return _smallest(np.where(control, _MASK, draws), fraction, exclude=control)


def _smallest(draws: np.ndarray, fraction: float, *, exclude: np.ndarray | None = None) -> np.ndarray:
    """The documents whose draw is below ``fraction`` of the range, or the ``MIN_DOCUMENTS``
    smallest draws when that is fewer (a small domain must still give every miner data)."""
    chosen = draws < np.uint64(int(fraction * _SPAN))
    if exclude is not None:
        chosen &= ~exclude
    available = len(draws) - (int(exclude.sum()) if exclude is not None else 0)
    need = min(MIN_DOCUMENTS, available)
    if int(chosen.sum()) < need:
        chosen = np.zeros(len(draws), dtype=bool)
        chosen[np.argsort(draws, kind="stable")[:need]] = True
    return chosen
