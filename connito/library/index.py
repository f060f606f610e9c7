"""The expert library on disk: one SQLite index plus content-addressed expert tensors.

Layout of a library folder ``LIB``::

    LIB/index.sqlite                      versions, removals, events, bases, domain configs
    LIB/experts/<tensors_sha256>.safetensors   each version's expert tensors (canonical keys)

The index is the only mutable file. Every write is one SQLite transaction (WAL journal, busy
timeout), so any number of processes may record into one library at once and a crash leaves
either the whole version or none of it. Expert files are written atomically before the index row
that names them and never change afterwards (their name is their digest), so an index row never
points at a missing or partial file. Recording the same (domain, cycle, tensors) twice is a no-op
that only fills fields the first writer did not know; history is never deleted: a removal is a row
of its own.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from connito.config import DomainConfig, config_digest
from connito.errors import LibraryError
from connito.fsutil import atomic_write
from connito.library.records import VersionDraft, VersionRecord, parse_version, version_name
from connito.library.rows import (
    FILLABLE,
    SCHEMA,
    SELECT,
    draft_columns,
    expert_id,
    expert_sort_key,
    to_record,
)
from connito.ml.selection_record import ExpertSelection
from connito.protocol.checkpoint import tensors_digest

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "INDEX_SCHEMA_VERSION", "LibraryEvent", "Library", "record_eval"]

INDEX_FILE = "index.sqlite"
INDEX_SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # a validator recording while another process rebuilds waits, never fails
WAL_RETRIES = 20  # switching a brand-new index to WAL needs a moment alone with the file


@dataclass(frozen=True, slots=True, kw_only=True)
class LibraryEvent:
    """One line of the library's history (recorded, updated, removed, evaluated)."""

    seq: int
    at: float
    kind: str
    version: str
    detail: str


class Library:
    """An expert library folder: open it, record versions, look them up, remove them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    # -- SQLite ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA synchronous = FULL")  # a recorded version survives a power cut
        return conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; ``BEGIN IMMEDIATE`` for writes so two writers serialise, never deadlock."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _init_schema(self) -> None:
        try:
            self._create_tables()
        except sqlite3.DatabaseError as exc:  # not SQLite, or unreadable: one line, not a traceback
            raise LibraryError(f"{self.index_path}: not a usable library index: {exc}") from None

    def _enable_wal(self) -> None:
        """Switch a new index to WAL once; a racing creator may hold the lock briefly, so retry."""
        for attempt in range(WAL_RETRIES):
            conn = self._connect()
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if attempt == WAL_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
            finally:
                conn.close()

    def _create_tables(self) -> None:
        self._enable_wal()
        with self._transaction(write=True) as conn:
            # statement by statement: executescript would COMMIT the open transaction
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(INDEX_SCHEMA_VERSION),))
            elif row["value"] != str(INDEX_SCHEMA_VERSION):
                raise LibraryError(
                    f"{self.index_path}: schema_version {row['value']}, this connito reads {INDEX_SCHEMA_VERSION}"
                )

    # -- expert tensors ----------------------------------------------------------------------

    def experts_path(self, tensors_sha256: str) -> Path:
        return self.root / "experts" / f"{tensors_sha256}.safetensors"

    def put_experts(self, experts: dict[str, torch.Tensor]) -> str:
        """Store expert tensors under their digest (atomic, once); returns the digest."""
        digest = tensors_digest(experts)
        path = self.experts_path(digest)
        if not path.exists():
            payload = {key: tensor.detach().contiguous().cpu() for key, tensor in sorted(experts.items())}
            atomic_write(path, safetensors.torch.save(payload))
        return digest

    def load_experts(self, record: VersionRecord) -> dict[str, torch.Tensor]:
        """The version's expert tensors, checked against its digest.

        Raises:
            LibraryError: the file is missing, unreadable, or its tensors do not match the digest.
        """
        path = self.experts_path(record.tensors_sha256)
        try:
            experts = safetensors.torch.load_file(str(path))
        except (OSError, safetensors.SafetensorError) as exc:
            raise LibraryError(f"{record.name}: cannot read {path}: {exc}") from None
        if tensors_digest(experts) != record.tensors_sha256:
            raise LibraryError(f"{record.name}: {path} does not match its digest (edited after recording?)")
        return experts

    # -- recording ---------------------------------------------------------------------------

    def record(self, draft: VersionDraft, experts: dict[str, torch.Tensor]) -> tuple[VersionRecord, bool]:
        """Record a version; returns (the record, True if it is new).

        Idempotent on (domain, cycle, tensors digest): a second call fills only the fields the
        first one left empty. The parent is the newest version holding ``draft.parent_revision``.

        Raises:
            LibraryError: ``experts`` do not hash to ``draft.tensors_sha256``.
        """
        digest = self.put_experts(experts)  # first: an index row never names a missing file
        if digest != draft.tensors_sha256:
            raise LibraryError(
                f"domain={draft.domain} cycle={draft.cycle}: tensors digest {digest[:12]}, draft says {draft.tensors_sha256[:12]}"
            )
        experts_list = sorted({expert_id(key) for key in experts}, key=expert_sort_key)
        now = time.time()
        with self._transaction(write=True) as conn:
            existing = conn.execute(
                "SELECT * FROM versions WHERE domain = ? AND cycle = ? AND tensors_sha256 = ?",
                (draft.domain, draft.cycle, draft.tensors_sha256),
            ).fetchone()
            if existing is not None:
                self._fill(conn, existing, draft, now)
                row = self._row(conn, draft.domain, existing["number"])
                return to_record(row), False
            number = conn.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE domain = ?", (draft.domain,)
            ).fetchone()[0]
            values = draft_columns(draft)
            values.update(
                number=number,
                experts=json.dumps(experts_list),
                parent=_parent(conn, draft),
                recorded_at=now,
            )
            columns = ", ".join(values)
            conn.execute(
                f"INSERT INTO versions ({columns}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            name = version_name(draft.domain, number)
            _event(
                conn,
                now,
                "record",
                name,
                f"cycle={draft.cycle} rev={draft.tensors_sha256[:12]} decision={draft.decision}",
            )
            row = self._row(conn, draft.domain, number)
        logger.info(
            "library recorded version=%s cycle=%d rev=%s", name, draft.cycle, draft.tensors_sha256[:12]
        )
        return to_record(row), True

    def _fill(self, conn: sqlite3.Connection, existing: sqlite3.Row, draft: VersionDraft, now: float) -> None:
        values = draft_columns(draft)
        filled = {
            name: values[name] for name in FILLABLE if existing[name] is None and values[name] is not None
        }
        if not filled:
            return
        assignments = ", ".join(f"{name} = ?" for name in filled)
        conn.execute(
            f"UPDATE versions SET {assignments} WHERE domain = ? AND number = ?",
            (*filled.values(), existing["domain"], existing["number"]),
        )
        _event(
            conn,
            now,
            "update",
            version_name(existing["domain"], existing["number"]),
            "filled " + ",".join(filled),
        )

    def remove(self, text: str, *, reason: str = "") -> tuple[VersionRecord, bool]:
        """Opt a version out: it is no longer served (``latest`` falls back to the previous one).

        Returns (the record, True if this call removed it). The version's row, tensors and events
        stay; the removal is recorded with its time and reason.

        Raises:
            LibraryError: no such version.
        """
        record = self.get(text)
        if record.is_removed:
            return record, False
        now = time.time()
        with self._transaction(write=True) as conn:
            done = conn.execute(
                "INSERT OR IGNORE INTO removals VALUES (?, ?, ?, ?)",
                (record.domain, record.number, now, reason),
            ).rowcount
            if done:
                _event(conn, now, "remove", record.name, reason)
            row = self._row(conn, record.domain, record.number)
        logger.info("library removed version=%s reason=%r", record.name, reason)
        return to_record(row), bool(done)

    def record_eval(self, text: str, result: dict) -> VersionRecord:
        """Attach a downstream evaluation (``connito owner-eval``'s JSON) to a version.

        Raises:
            LibraryError: no such version.
        """
        record = self.get(text)
        now = time.time()
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO evals (domain, number, at, body) VALUES (?, ?, ?, ?)",
                (record.domain, record.number, now, json.dumps(result, sort_keys=True)),
            )
            _event(conn, now, "eval", record.name, ",".join(sorted(result.get("tasks", {}) or {})))
        return record

    def evals(self, text: str) -> list[dict]:
        """Every evaluation attached to a version, oldest first."""
        record = self.get(text)
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT at, body FROM evals WHERE domain = ? AND number = ? ORDER BY seq",
                (record.domain, record.number),
            ).fetchall()
        return [{"at": row["at"], "result": json.loads(row["body"])} for row in rows]

    # -- reading -----------------------------------------------------------------------------

    def versions(self, domain: str | None = None) -> list[VersionRecord]:
        """Every version (removed ones too), by domain then number."""
        query = SELECT + (" WHERE v.domain = ?" if domain else "") + " ORDER BY v.domain, v.number"
        with self._transaction(write=False) as conn:
            rows = conn.execute(query, (domain,) if domain else ()).fetchall()
        return [to_record(row) for row in rows]

    def get(self, text: str) -> VersionRecord:
        """The version a name means: ``math@v3`` exactly, ``math@latest`` the newest not removed.

        Raises:
            LibraryError: a malformed name, an unknown version, or no version left for ``latest``.
        """
        ref = parse_version(text)
        with self._transaction(write=False) as conn:
            if ref.number is None:
                row = conn.execute(
                    SELECT + " WHERE v.domain = ? AND r.at IS NULL ORDER BY v.number DESC LIMIT 1",
                    (ref.domain,),
                ).fetchone()
            else:
                row = self._row(conn, ref.domain, ref.number)
        if row is None:
            known = sorted({r.domain for r in self.versions()})
            raise LibraryError(
                f"version {text!r}: not in library {self.root} (domains: {', '.join(known) or 'none'})"
            )
        return to_record(row)

    def find_revision(self, domain: str, cycle: int, tensors_sha256: str) -> VersionRecord | None:
        """The version recorded for exactly this (domain, cycle, tensors digest), if any."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                SELECT + " WHERE v.domain = ? AND v.cycle = ? AND v.tensors_sha256 = ?",
                (domain, cycle, tensors_sha256),
            ).fetchone()
        return to_record(row) if row is not None else None

    def events(self, version: str | None = None) -> list[LibraryEvent]:
        """The library's history, oldest first (optionally of one version name)."""
        query = "SELECT * FROM events" + (" WHERE version = ?" if version else "") + " ORDER BY seq"
        with self._transaction(write=False) as conn:
            rows = conn.execute(query, (version,) if version else ()).fetchall()
        return [
            LibraryEvent(seq=r["seq"], at=r["at"], kind=r["kind"], version=r["version"], detail=r["detail"])
            for r in rows
        ]

    @staticmethod
    def _row(conn: sqlite3.Connection, domain: str, number: int) -> sqlite3.Row | None:
        return conn.execute(SELECT + " WHERE v.domain = ? AND v.number = ?", (domain, number)).fetchone()

    # -- what versions need to be rebuilt into models ----------------------------------------

    def put_base(self, model_id: str, model_revision: str, location: str) -> None:
        """Remember where the base model (id, revision) lives: a local folder or a Hub id."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO bases VALUES (?, ?, ?) ON CONFLICT (model_id, model_revision)"
                " DO UPDATE SET location = excluded.location",
                (model_id, model_revision, location),
            )

    def base_location(self, model_id: str, model_revision: str) -> str | None:
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT location FROM bases WHERE model_id = ? AND model_revision = ?",
                (model_id, model_revision),
            ).fetchone()
        return row["location"] if row is not None else None

    def put_domain(self, config: DomainConfig, selection: ExpertSelection) -> None:
        """Keep the domain YAML (as JSON) and the selection a version was trained under."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO configs VALUES (?, ?, ?)",
                (config_digest(config), config.name, config.model_dump_json()),
            )
            conn.execute(
                "INSERT OR IGNORE INTO selections VALUES (?, ?, ?)",
                (selection.digest, selection.domain, selection.model_dump_json()),
            )

    def domain_config(self, digest: str) -> DomainConfig:
        """The domain config recorded under ``digest``.

        Raises:
            LibraryError: none recorded.
        """
        body = self._body("configs", digest)
        return DomainConfig.model_validate_json(body)

    def selection(self, digest: str) -> ExpertSelection:
        """The expert selection recorded under ``digest``.

        Raises:
            LibraryError: none recorded.
        """
        return ExpertSelection.model_validate_json(self._body("selections", digest))

    def _body(self, table: str, digest: str) -> str:
        with self._transaction(write=False) as conn:
            row = conn.execute(f"SELECT body FROM {table} WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise LibraryError(f"library {self.root}: no {table[:-1]} with digest {digest[:12]}")
        return row["body"]


def _event(conn: sqlite3.Connection, at: float, kind: str, version: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO events (at, kind, version, detail) VALUES (?, ?, ?, ?)", (at, kind, version, detail)
    )


def _parent(conn: sqlite3.Connection, draft: VersionDraft) -> str | None:
    """The newest version (same domain first) whose tensors are the draft's parent state."""
    row = conn.execute(
        "SELECT domain, number FROM versions WHERE tensors_sha256 = ?"
        " ORDER BY domain != ?, number DESC LIMIT 1",
        (draft.parent_revision, draft.domain),
    ).fetchone()
    return version_name(row["domain"], row["number"]) if row is not None else None


def record_eval(library: str | Path, version: str, result: dict) -> VersionRecord:
    """``connito owner-eval``'s hook: attach ``result`` to ``version`` of the library at ``library``."""
    return Library(library).record_eval(version, result)
