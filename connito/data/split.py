"""Held-out split and miner shards, both decided by a sha256 of each document's text.

The rule this module keeps: a held-out document is never a training document. Because the split is
a pure function of the text (not of its position, the source order or a seed), every miner and
validator on every machine agrees on it, a document added later cannot move an old one across the
line, and an identical copy of a held-out document is held out too. Miner shards use other bytes of
the same digest, so a shard is a stable, document-level subset of the training documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from connito.errors import ConfigError

__all__ = [
    "DocumentSplit",
    "document_digest",
    "is_heldout",
    "shard_key",
    "shard_of",
    "split_documents",
    "shard_documents",
    "unique_documents",
]

_SPAN = 2**64  # the held-out test reads 8 digest bytes as a fraction of this


def document_digest(text: str) -> bytes:
    """sha256 of the UTF-8 text: the identity of a document everywhere in connito."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def is_heldout(text: str, fraction: float) -> bool:
    """Whether ``text`` belongs to the held-out ``fraction`` (digest bytes 0..7 as a uniform draw)."""
    return int.from_bytes(document_digest(text)[:8], "big") < fraction * _SPAN


def shard_key(text: str) -> int:
    """The 64-bit key a document's shard is taken from (digest bytes 8..15, independent of the split)."""
    return int.from_bytes(document_digest(text)[8:16], "big")


def shard_of(text: str, num_shards: int) -> int:
    """The miner shard of ``text``: ``shard_key(text) % num_shards``.

    Raises:
        ConfigError: ``num_shards`` < 1.
    """
    _check_shard(0, num_shards)
    return shard_key(text) % num_shards


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentSplit:
    """Training and held-out documents of one source, unique, in source order."""

    train: list[str]
    heldout: list[str]


def unique_documents(documents: Sequence[str]) -> list[str]:
    """Drop exact repeats, keeping the first occurrence (order is otherwise preserved)."""
    seen: set[bytes] = set()
    unique: list[str] = []
    for text in documents:
        digest = document_digest(text)
        if digest not in seen:
            seen.add(digest)
            unique.append(text)
    return unique


def split_documents(
    documents: Sequence[str],
    *,
    heldout_fraction: float | None,
    exclude: Collection[str] = (),
) -> DocumentSplit:
    """Split ``documents`` into training and held-out parts.

    With ``heldout_fraction`` set, documents that ``is_heldout`` picks are held out. Documents equal
    to any in ``exclude`` (explicit validation text, validator-private files) never reach ``train``
    and are not returned as held out either: the caller owns that set. ``None`` disables the hash
    split, for domains whose held-out set is given explicitly.
    """
    excluded = {document_digest(text) for text in exclude}
    train: list[str] = []
    heldout: list[str] = []
    for text in unique_documents(documents):
        if document_digest(text) in excluded:
            continue
        if heldout_fraction is not None and is_heldout(text, heldout_fraction):
            heldout.append(text)
        else:
            train.append(text)
    return DocumentSplit(train=train, heldout=heldout)


def shard_documents(documents: Sequence[str], shard_index: int, num_shards: int) -> list[str]:
    """The documents of miner shard ``shard_index`` out of ``num_shards`` (order preserved).

    Raises:
        ConfigError: ``num_shards`` < 1 or ``shard_index`` outside ``[0, num_shards)``.
    """
    _check_shard(shard_index, num_shards)
    return [text for text in documents if shard_key(text) % num_shards == shard_index]


def _check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ConfigError(f"must be >= 1, got {num_shards}", field="num_shards")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"must be in [0, {num_shards}), got {shard_index}", field="shard_index")
