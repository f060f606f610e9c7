"""Rows of the library index: its SQLite schema and the mapping between rows and records.

Scalars are columns (so ``sqlite3 LIB/index.sqlite`` answers questions directly); the two lists
(experts, contributors) are JSON text. A row that no longer validates as a ``VersionRecord`` is
reported as a ``LibraryError`` naming the version, never silently repaired.
"""

from __future__ import annotations

import json
import math
import sqlite3

from pydantic import ValidationError

from connito.errors import LibraryError
from connito.library.records import (
    Contributor,
    Removal,
    StoreLocation,
    VersionDraft,
    VersionRecord,
    version_name,
)
from connito.ml.moe import parse_expert_key

__all__ = ["SCHEMA", "FILLABLE", "SELECT", "draft_columns", "to_record", "expert_id", "expert_sort_key"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    domain TEXT NOT NULL,
    number INTEGER NOT NULL,
    cycle INTEGER NOT NULL,
    tensors_sha256 TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_revision TEXT NOT NULL,
    selection_digest TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    experts TEXT NOT NULL,              -- JSON list of "L.E"
    store_kind TEXT, store_repo TEXT, store_revision TEXT,
    domain_loss REAL, general_loss REAL, eval_seed INTEGER,
    parent TEXT,
    parent_revision TEXT NOT NULL,
    decision TEXT NOT NULL,
    contributors TEXT NOT NULL,         -- JSON list of Contributor
    merge_record_sha256 TEXT NOT NULL,
    lead_hotkey TEXT NOT NULL,
    block INTEGER,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (domain, number),
    UNIQUE (domain, cycle, tensors_sha256)
);
CREATE INDEX IF NOT EXISTS versions_by_revision ON versions (tensors_sha256);
CREATE TABLE IF NOT EXISTS removals (
    domain TEXT NOT NULL, number INTEGER NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (domain, number)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('record', 'update', 'remove', 'eval')),
    version TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bases (
    model_id TEXT NOT NULL, model_revision TEXT NOT NULL, location TEXT NOT NULL,
    PRIMARY KEY (model_id, model_revision)
);
CREATE TABLE IF NOT EXISTS evals (              -- downstream results (connito owner-eval)
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    domain TEXT NOT NULL, number INTEGER NOT NULL, at REAL NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS configs (digest TEXT PRIMARY KEY, domain TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS selections (digest TEXT PRIMARY KEY, domain TEXT NOT NULL, body TEXT NOT NULL);
"""
# Fields a later writer may fill in when the first one did not know them (e.g. a non-lead that
# recorded before the lead's losses arrived, or a rebuild that learns the commitment block).
FILLABLE = (
    "store_kind",
    "store_repo",
    "store_revision",
    "domain_loss",
    "general_loss",
    "eval_seed",
    "block",
)

SELECT = (
    "SELECT v.*, r.at AS removed_at, r.reason AS removed_reason FROM versions v"
    " LEFT JOIN removals r ON r.domain = v.domain AND r.number = v.number"
)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def draft_columns(draft: VersionDraft) -> dict[str, object]:
    store = draft.store
    return {
        "domain": draft.domain,
        "cycle": draft.cycle,
        "tensors_sha256": draft.tensors_sha256,
        "model_id": draft.model_id,
        "model_revision": draft.model_revision,
        "selection_digest": draft.selection_digest,
        "config_digest": draft.config_digest,
        "store_kind": store.kind if store else None,
        "store_repo": store.repo if store else None,
        "store_revision": store.revision if store else None,
        "domain_loss": _finite(draft.domain_loss),
        "general_loss": _finite(draft.general_loss),
        "eval_seed": draft.eval_seed,
        "parent_revision": draft.parent_revision,
        "decision": draft.decision,
        "contributors": json.dumps([c.model_dump(mode="json") for c in draft.contributors]),
        "merge_record_sha256": draft.merge_record_sha256,
        "lead_hotkey": draft.lead_hotkey,
        "block": draft.block,
    }


def to_record(row: sqlite3.Row | None) -> VersionRecord:
    assert row is not None, "callers check for a missing row"
    has_store = row["store_kind"] is not None
    try:
        return VersionRecord(
            name=version_name(row["domain"], row["number"]),
            domain=row["domain"],
            number=row["number"],
            model_id=row["model_id"],
            model_revision=row["model_revision"],
            selection_digest=row["selection_digest"],
            config_digest=row["config_digest"],
            cycle=row["cycle"],
            tensors_sha256=row["tensors_sha256"],
            experts=tuple(json.loads(row["experts"])),
            store=StoreLocation(
                kind=row["store_kind"], repo=row["store_repo"], revision=row["store_revision"]
            )
            if has_store
            else None,
            domain_loss=row["domain_loss"],
            general_loss=row["general_loss"],
            eval_seed=row["eval_seed"],
            parent=row["parent"],
            parent_revision=row["parent_revision"],
            decision=row["decision"],
            contributors=tuple(Contributor.model_validate(c) for c in json.loads(row["contributors"])),
            merge_record_sha256=row["merge_record_sha256"],
            lead_hotkey=row["lead_hotkey"],
            block=row["block"],
            recorded_at=row["recorded_at"],
            removed=Removal(at=row["removed_at"], reason=row["removed_reason"])
            if row["removed_at"] is not None
            else None,
        )
    except (ValidationError, ValueError) as exc:
        detail = str(exc).splitlines()[0]
        raise LibraryError(
            f"version {row['domain']}@v{row['number']}: index row is invalid: {detail}"
        ) from None


def expert_id(key: str) -> str:
    layer, expert, _ = parse_expert_key(key)
    return f"{layer}.{expert}"


def expert_sort_key(item: str) -> tuple[int, int]:
    layer, expert = item.split(".")
    return int(layer), int(expert)
