"""How a raw commitment looks to subtensor's Commitments pallet: the ``Raw{n}`` field we write, how
decoded fields turn back into bytes, and how far apart writes must be to stay in the pallet's
per-epoch byte budget.

Pure functions of values: no network, no SDK. ``SubtensorChain`` (``connito.chain.subtensor``)
uses them to write and read commitments.

May import: the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_SPACE_BYTES",
    "MAX_COMMITMENT_BYTES",
    "commit_spacing_blocks",
    "commitment_info",
    "decode_commitment_fields",
]

MAX_COMMITMENT_BYTES = 128  # the Commitments pallet's largest Raw{n} Data variant is Raw128
# pallet-commitments charges each write max(100, payload bytes) of a per-hotkey byte budget
# (MaxSpace) that resets every subnet epoch (tempo + 1 blocks); see commit_spacing_blocks.
_MIN_COMMIT_SPACE_BYTES = 100
_COMMIT_SPACE_BYTES = max(_MIN_COMMIT_SPACE_BYTES, MAX_COMMITMENT_BYTES)
# The pallet's documented DefaultMaxSpace; used only when the runtime exposes no MaxSpace.
DEFAULT_MAX_SPACE_BYTES = 3100


def commitment_info(data: bytes) -> dict[str, Any]:
    """The ``info`` argument of ``Commitments.set_commitment`` for one raw payload.

    One ``Raw{n}`` field whose variant name states the byte count (the pallet's ``Data`` enum runs
    Raw0..Raw128) and whose value is the bytes themselves (a hex string risks being encoded as
    text, doubling the length). The field list is flat, the shape v11's codec decodes
    ``CommitmentOf`` into; v10 wrapped it (``[[...]]``) for py-scale-codec's BoundedVec.
    """
    return {"fields": [{f"Raw{len(data)}": bytes(data)}]}


def decode_commitment_fields(fields: Any) -> bytes | None:
    """Concatenate the ``Raw*`` fields of a decoded commitment back into bytes.

    Returns None when the commitment carries no raw field (a hash, a sealed timelock payload, a
    record of another protocol): it is not ours to read. Accepts the value as 0x-hex, bytes or a
    list of ints, and tolerates the tuple-wrapped field list older codecs produced.
    """
    raw = bytearray()
    found = False
    for entry in _flatten_fields(fields):
        for variant, value in entry.items():
            if not str(variant).startswith("Raw"):
                continue
            chunk = _field_bytes(value)
            if chunk is None:
                return None
            raw += chunk
            found = True
    return bytes(raw) if found else None


def commit_spacing_blocks(*, tempo: int, max_space_bytes: int) -> int:
    """Blocks to leave between two commitments so the pallet's byte budget can never run out.

    The chain has no block-based commitment rate limit any more: each write costs
    ``max(100, len)`` bytes of a ``MaxSpace`` budget per hotkey per epoch. Spacing our (at most
    128-byte) writes ``ceil((tempo + 1) / (MaxSpace // 128))`` blocks apart fits at most
    ``MaxSpace // 128`` of them into any window of one epoch. Mainnet (tempo 360, MaxSpace 3100):
    16 blocks.
    """
    writes_per_epoch = max(1, max_space_bytes // _COMMIT_SPACE_BYTES)
    return math.ceil((tempo + 1) / writes_per_epoch)


def _flatten_fields(fields: Any) -> list[Mapping[str, Any]]:
    """The field variants as one-key mappings, unwrapping list/tuple nesting."""
    if isinstance(fields, Mapping):
        return [fields]
    if isinstance(fields, (list, tuple)):
        return [entry for item in fields for entry in _flatten_fields(item)]
    return []  # unit variants (e.g. "ResetBondsFlag") carry no bytes


def _field_bytes(value: Any) -> bytes | None:
    """A Raw field's payload as bytes, or None if it is not a byte string."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and not isinstance(value[0], int):
            return _field_bytes(value[0])  # tuple-wrapped [u8; N]
        if all(isinstance(b, int) and 0 <= b < 256 for b in value):
            return bytes(value)
    return None
