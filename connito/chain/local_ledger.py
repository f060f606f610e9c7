"""The local chain's ledger file: its SQLite schema, how a new one is born at genesis (validated,
then linked into place atomically), how a connection to it is opened, and how its chain row reads.

``LocalChain`` (``connito.chain.local``) owns the transactions and the chain's rules on top of it.

May import: connito.errors, connito.chain.base.
"""

from __future__ import annotations

import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from bittensor.sp_core import ss58_decode

from connito.chain.base import ChainParams
from connito.errors import ChainError

__all__ = [
    "BUSY_TIMEOUT_S",
    "MAX_UID",
    "SCHEMA_VERSION",
    "ChainRow",
    "GenesisNeuron",
    "check_genesis_limits",
    "check_genesis_params",
    "check_neuron",
    "connect_ledger",
    "read_chain_row",
    "write_new_ledger",
    "write_weights_version",
]

SCHEMA_VERSION = 2  # 2: the hyperparameters table (weights_version)
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's transaction to finish
MAX_UID = 0xFFFF  # uids are u16 on chain and in the weights payload

_SCHEMA = """
CREATE TABLE chain (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    schema_version INTEGER NOT NULL,
    netuid INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    block_time_s REAL,                      -- NULL: manual clock, blocks move only by advance
    genesis_time REAL NOT NULL,             -- unix seconds of block 0
    block_offset INTEGER NOT NULL,          -- blocks added by advance_blocks
    tempo INTEGER NOT NULL,
    weights_rate_limit INTEGER NOT NULL,
    commitment_rate_limit INTEGER NOT NULL
);
CREATE TABLE neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    stake REAL NOT NULL,
    validator_permit INTEGER NOT NULL,
    registered_block INTEGER NOT NULL
);
CREATE TABLE writes (                       -- every signed write ever accepted, in order
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('commitment', 'weights')),
    hotkey TEXT NOT NULL,
    uid INTEGER NOT NULL,
    block INTEGER NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX writes_by_hotkey ON writes (kind, hotkey, seq);
CREATE TABLE hyperparameters (              -- the owner's knobs that change after genesis
    name TEXT PRIMARY KEY CHECK (name IN ('weights_version')),
    value INTEGER NOT NULL
);
INSERT INTO hyperparameters VALUES ('weights_version', 0);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenesisNeuron:
    """A neuron registered at block 0; uids follow the order of the genesis list."""

    hotkey: str
    stake: float = 0.0
    validator_permit: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainRow:
    """The ledger's one ``chain`` row: the subnet, its clock and its hyperparameters."""

    netuid: int
    seed: int
    block_time_s: float | None
    genesis_time: float
    block_offset: int
    params: ChainParams


def read_chain_row(conn: sqlite3.Connection, path: Path) -> ChainRow:
    """The chain row of the ledger at ``path``, read on ``conn``.

    Raises:
        ChainError: the file is not a ledger, or its schema version is not ``SCHEMA_VERSION``.
    """
    try:
        fields = conn.execute("SELECT * FROM chain WHERE id = 0").fetchone()
    except sqlite3.Error as e:
        raise ChainError(f"ledger {path}: not a connito local chain ledger: {e}") from e
    if fields is None or fields[1] != SCHEMA_VERSION:
        found = None if fields is None else fields[1]
        raise ChainError(f"ledger {path}: schema_version={found}, expected {SCHEMA_VERSION}")
    _, _, netuid, seed, block_time_s, genesis_time, offset, tempo, wrl, crl = fields
    (weights_version,) = conn.execute(
        "SELECT value FROM hyperparameters WHERE name = 'weights_version'"
    ).fetchone()
    params = ChainParams(
        tempo=tempo, weights_rate_limit=wrl, commitment_rate_limit=crl, weights_version=weights_version
    )
    return ChainRow(
        netuid=netuid,
        seed=seed,
        block_time_s=block_time_s,
        genesis_time=genesis_time,
        block_offset=offset,
        params=params,
    )


def write_weights_version(conn: sqlite3.Connection, path: Path, value: int) -> None:
    """Set the subnet's minimum weights ``version_key`` (the owner's ``sudo_set_weights_version_key``).

    Raises:
        ChainError: ``value`` is not a u64.
    """
    if not 0 <= value < 2**64:
        raise ChainError(f"ledger {path}: weights_version: must be a u64, got {value}")
    conn.execute("UPDATE hyperparameters SET value = ? WHERE name = 'weights_version'", (value,))


def connect_ledger(path: Path) -> sqlite3.Connection:
    """A connection to an existing ledger, in autocommit mode (the caller issues ``BEGIN``).

    Raises:
        sqlite3.Error: the file cannot be opened.
    """
    # mode=rw: never create an empty database by accident; isolation_level=None: we issue BEGIN.
    uri = path.resolve().as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")  # an accepted write survives power loss
    return conn


def write_new_ledger(target: Path, chain_row: tuple[object, ...], neurons: list[GenesisNeuron]) -> None:
    """Build a ledger in a temp file and hard-link it to ``target``; never overwrites one.

    Raises:
        ChainError: ``target`` exists or the ledger cannot be written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.genesis-{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file: readers never block writers
            conn.executescript("BEGIN;" + _SCHEMA)
            conn.execute("INSERT INTO chain VALUES (0, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chain_row)
            conn.executemany(
                "INSERT INTO neurons VALUES (?, ?, ?, ?, 0)",
                [(uid, n.hotkey, n.stake, int(n.validator_permit)) for uid, n in enumerate(neurons)],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        os.link(tmp, target)  # atomic and refuses to replace: two racing geneses cannot both win
    except FileExistsError as e:
        raise ChainError(f"genesis refused {target}: ledger already exists") from e
    except (sqlite3.Error, OSError) as e:
        raise ChainError(f"genesis {target}: cannot write ledger: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def check_genesis_params(target: Path, *, netuid: int, seed: int, neurons: list[GenesisNeuron]) -> None:
    """Refuse a genesis over an existing file, or with a bad netuid, seed or neuron list."""
    if target.exists():
        raise ChainError(f"genesis refused {target}: ledger already exists")
    if not 0 <= netuid <= 0xFFFF:
        raise ChainError(f"genesis {target}: netuid: must be in [0, 65535], got {netuid}")
    if not 0 <= seed < 2**63:
        raise ChainError(f"genesis {target}: seed: must be in [0, 2**63), got {seed}")
    if len(neurons) > MAX_UID + 1:
        raise ChainError(f"genesis {target}: neurons: {len(neurons)} given, max {MAX_UID + 1}")
    hotkeys = [n.hotkey for n in neurons]
    if len(set(hotkeys)) != len(hotkeys):
        raise ChainError(f"genesis {target}: neurons: duplicate hotkey")
    for neuron in neurons:
        check_neuron(neuron)


def check_genesis_limits(
    target: Path, tempo: int, weights_rate_limit: int, commitment_rate_limit: int, block_time_s: float | None
) -> None:
    """Refuse a genesis with a bad tempo, rate limit or block time."""
    for name, value, low in (
        ("tempo", tempo, 1),
        ("weights_rate_limit", weights_rate_limit, 0),
        ("commitment_rate_limit", commitment_rate_limit, 0),
    ):
        if value < low:
            raise ChainError(f"genesis {target}: {name}: must be >= {low}, got {value}")
    if block_time_s is not None and not (math.isfinite(block_time_s) and block_time_s >= 0):
        raise ChainError(f"genesis {target}: block_time_s: must be None or >= 0, got {block_time_s}")


def check_neuron(neuron: GenesisNeuron) -> None:
    """Refuse a neuron whose hotkey is not an ss58 address or whose stake is not finite and >= 0."""
    try:
        ss58_decode(neuron.hotkey)
    except ValueError as e:
        raise ChainError(f"neuron hotkey={neuron.hotkey!r}: not an ss58 address: {e}") from e
    if not (math.isfinite(neuron.stake) and neuron.stake >= 0):
        raise ChainError(f"neuron hotkey={neuron.hotkey}: stake: must be finite and >= 0, got {neuron.stake}")
