"""LocalChain: the embedded chain, one SQLite ledger file shared by processes on one machine.

It is the default backend of ``connito localnet`` and of the tests, and it keeps the rules the
neurons rely on from the real chain: blocks advance (with the wall clock or by hand), block hashes
are unpredictable before the block exists, every write is sr25519-signed by a registered hotkey
and verified before it is stored, commitments and weights are rate limited, and a new commitment
replaces the old one. The rule it keeps: the ledger is only changed inside one ``BEGIN IMMEDIATE``
transaction per write, so concurrent writers never lose an update and a crash never leaves half
a write behind.

The ledger file itself (schema, genesis, connection) lives in ``connito.chain.local_ledger``; the
bytes a write signs and the weights payload in ``connito.chain.local_signing``.

May import: connito.errors, connito.chain.base, connito.chain.local_ledger, connito.chain.local_signing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bittensor as bt
from bittensor.sp_core import Keypair

from connito.chain.base import ChainParams, Commitment, Neuron
from connito.chain.local_ledger import (
    MAX_UID,
    SCHEMA_VERSION,
    ChainRow,
    GenesisNeuron,
    check_genesis_limits,
    check_genesis_params,
    check_neuron,
    connect_ledger,
    read_chain_row,
    write_new_ledger,
    write_weights_version,
)
from connito.chain.local_signing import (
    decode_weights,
    encode_weights,
    hotkey_keypair,
    sign,
    signing_message,
    verify_signature,
)
from connito.errors import ChainError

__all__ = ["MAX_COMMITMENT_BYTES", "LocalChain"]

logger = logging.getLogger(__name__)

MAX_COMMITMENT_BYTES = 128  # the chain's Raw field budget; protocol commitments fit in it
BLOCK_HASH_DOMAIN = b"connito-localchain-block-v1"
_OPERATION = {"commitment": "commit", "weights": "set_weights"}  # write kind -> method name


class LocalChain:
    """The embedded chain: one subnet in one SQLite ledger (see the module docstring).

    Each method opens its own connection, so one object is safe across threads and fork, and any
    number of processes may open the same ledger.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        wallet: bt.Wallet | Keypair | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._path = Path(path)
        self._clock = clock if clock is not None else time.time
        self._keypair = hotkey_keypair(wallet)
        self._chain_row()  # fail now, not at the first read, if the ledger is missing or foreign

    def __repr__(self) -> str:
        return f"LocalChain(path={str(self._path)!r}, hotkey={self.hotkey!r})"

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        wallet: bt.Wallet | Keypair | None = None,
        clock: Callable[[], float] | None = None,
    ) -> LocalChain:
        """Open an existing ledger; without a wallet the chain is read-only.

        Raises:
            ChainError: the ledger is missing, not a ledger, or from another schema version.
        """
        return cls(path, wallet=wallet, clock=clock)

    @classmethod
    def genesis(
        cls,
        path: str | Path,
        *,
        netuid: int,
        seed: int,
        neurons: list[GenesisNeuron],
        block_time_s: float | None = None,
        tempo: int = 360,
        weights_rate_limit: int = 100,
        commitment_rate_limit: int = 100,
        genesis_time: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> LocalChain:
        """Create a new ledger at block 0 and return it opened read-only.

        The ledger is built in a temp file and hard-linked into place, so a crash leaves no
        half-made ledger and an existing one is never overwritten. ``block_time_s`` None or 0
        gives the manual clock (tests); otherwise blocks follow the wall clock from
        ``genesis_time`` (default: now).

        Raises:
            ChainError: the path exists, or a parameter or neuron is invalid.
        """
        target = Path(path)
        check_genesis_params(target, netuid=netuid, seed=seed, neurons=neurons)
        check_genesis_limits(target, tempo, weights_rate_limit, commitment_rate_limit, block_time_s)
        start = genesis_time if genesis_time is not None else (clock or time.time)()
        row = (SCHEMA_VERSION, netuid, seed, block_time_s or None, start, 0, tempo) + (
            weights_rate_limit,
            commitment_rate_limit,
        )
        write_new_ledger(target, row, neurons)
        logger.info("chain=local genesis path=%s netuid=%s neurons=%s", target, netuid, len(neurons))
        return cls(target, clock=clock)

    # ---- reads ---------------------------------------------------------------------------

    @property
    def hotkey(self) -> str | None:
        """ss58 of the hotkey this object writes as (None: read-only)."""
        return self._keypair.ss58_address if self._keypair is not None else None

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def netuid(self) -> int:
        """The subnet this ledger holds."""
        return self._chain_row().netuid

    def current_block(self) -> int:
        """The latest block: wall-clock blocks since genesis plus manual advances."""
        return self._block_of(self._chain_row())

    def block_hash(self, block: int) -> str:
        """``0x`` + sha256(seed, block): deterministic per ledger, unknown before it exists.

        Raises:
            ChainError: the block is negative or in the future.
        """
        row = self._chain_row()
        current = self._block_of(row)
        if block < 0 or block > current:
            raise ChainError(f"block_hash refused block={block}: must be in [0, {current}] (current block)")
        return _block_hash(row.seed, block)

    def params(self) -> ChainParams:
        """The subnet hyperparameters fixed at genesis."""
        return self._chain_row().params

    def metagraph(self) -> list[Neuron]:
        """Every registered neuron, ordered by uid."""
        with self._transaction(write=False) as conn:
            return _neurons(conn)

    def commitments(self, block: int | None = None) -> list[Commitment]:
        """The latest commitment (at or before ``block``) of every registered hotkey, ordered by uid.

        Raises:
            ChainError: ``block`` is after the current block.
        """
        with self._transaction(write=False) as conn:
            if block is not None and block > self._block_of(self._chain_row(conn)):
                raise ChainError(f"cannot read commitments at block {block}: the chain is not there yet")
            limit = block if block is not None else 2**62
            rows = conn.execute(
                "SELECT w.hotkey, w.block, w.payload FROM writes w JOIN neurons n ON n.hotkey = w.hotkey"
                " WHERE w.seq = (SELECT MAX(seq) FROM writes WHERE kind = 'commitment'"
                " AND hotkey = w.hotkey AND block <= ?) ORDER BY n.uid",
                (limit,),
            ).fetchall()
        return [Commitment(hotkey=h, block=b, data=bytes(d)) for h, b, d in rows]

    def commitment_history(self, hotkey: str | None = None) -> list[Commitment]:
        """Every commitment ever accepted (optionally of one hotkey), in write order; for audits."""
        query = "SELECT hotkey, block, payload FROM writes WHERE kind = 'commitment'"
        args: tuple[str, ...] = ()
        if hotkey is not None:
            query, args = query + " AND hotkey = ?", (hotkey,)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY seq", args).fetchall()
        return [Commitment(hotkey=h, block=b, data=bytes(d)) for h, b, d in rows]

    def weights(self) -> dict[int, dict[int, float]]:
        """The latest normalised weights of every registered hotkey that set any, by its uid."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT n.uid, w.payload FROM writes w JOIN neurons n ON n.hotkey = w.hotkey"
                " WHERE w.seq = (SELECT MAX(seq) FROM writes WHERE kind = 'weights'"
                " AND hotkey = w.hotkey) ORDER BY n.uid"
            ).fetchall()
        return {uid: decode_weights(bytes(payload)) for uid, payload in rows}

    def audit(self) -> int:
        """Re-verify the signature of every stored write; returns how many were checked.

        Raises:
            ChainError: a stored write's signature does not verify (the ledger was tampered with).
        """
        with self._transaction(write=False) as conn:
            netuid = self._chain_row(conn).netuid
            rows = conn.execute("SELECT seq, kind, hotkey, block, payload, signature FROM writes").fetchall()
        for seq, kind, hotkey, block, payload, signature in rows:
            message = signing_message(netuid=netuid, kind=kind, block=block, payload=bytes(payload))
            try:
                verify_signature(hotkey=hotkey, message=message, signature=bytes(signature))
            except ChainError as e:
                raise ChainError(f"ledger {self._path}: write seq={seq} kind={kind}: {e}") from e
        return len(rows)

    # ---- signed writes -------------------------------------------------------------------

    def commit(self, data: bytes) -> int:
        """Write this hotkey's commitment, replacing its previous one; returns its block.

        Raises:
            ChainError: read-only, too long, not registered, or rate limited.
        """
        if len(data) > MAX_COMMITMENT_BYTES:
            raise ChainError(
                f"commit refused hotkey={self.hotkey}: {len(data)} bytes, max {MAX_COMMITMENT_BYTES}"
            )
        payload = bytes(data)
        return self._signed_write("commitment", lambda _conn, _neuron: payload)

    def set_weights(self, weights: dict[int, float], *, version_key: int = 0) -> int:
        """Set this validator's weights, normalised to sum 1; returns the block.

        Raises:
            ChainError: read-only, not registered, no validator permit, rate limited, a
                ``version_key`` below the subnet's ``weights_version``, or the weights are
                empty, non-finite, negative, all zero or name an unknown uid.
        """

        def payload(conn: sqlite3.Connection, neuron: Neuron) -> bytes:
            required = read_chain_row(conn, self._path).params.weights_version
            if version_key < required:  # subtensor's IncorrectWeightVersionKey
                raise ChainError(
                    f"set_weights refused hotkey={neuron.hotkey}: IncorrectWeightVersionKey "
                    f"version_key={version_key} is below the subnet's weights_version={required}"
                )
            if not neuron.validator_permit:
                raise ChainError(
                    f"set_weights refused hotkey={neuron.hotkey} uid={neuron.uid}: no validator permit"
                )
            known_uids = {n.uid for n in _neurons(conn)}
            return encode_weights(weights, known_uids=known_uids, hotkey=neuron.hotkey)

        return self._signed_write("weights", payload)

    def _signed_write(self, kind: str, build_payload: Callable[[sqlite3.Connection, Neuron], bytes]) -> int:
        """Check, sign, verify and store one write inside one IMMEDIATE transaction."""
        operation = _OPERATION[kind]
        keypair = self._require_keypair(operation)
        hotkey = keypair.ss58_address
        with self._transaction(write=True) as conn:
            row = self._chain_row(conn)
            block = self._block_of(row)
            neuron = _registered(conn, hotkey, operation=operation)
            payload = build_payload(conn, neuron)
            limit_blocks = (
                row.params.weights_rate_limit if kind == "weights" else row.params.commitment_rate_limit
            )
            _check_rate_limit(conn, kind=kind, hotkey=hotkey, block=block, limit_blocks=limit_blocks)
            message = signing_message(netuid=row.netuid, kind=kind, block=block, payload=payload)
            signature = sign(keypair, message)
            verify_signature(hotkey=hotkey, message=message, signature=signature)
            conn.execute(
                "INSERT INTO writes (kind, hotkey, uid, block, payload, signature) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, hotkey, neuron.uid, block, payload, signature),
            )
        logger.info(
            "chain=local write=%s hotkey=%s uid=%s block=%s bytes=%s",
            kind,
            hotkey,
            neuron.uid,
            block,
            len(payload),
        )
        return block

    # ---- admin (the subnet owner's hand on a local ledger) -------------------------------

    def advance_blocks(self, n: int) -> int:
        """Move the chain ``n`` blocks forward (on any clock); returns the new block.

        Raises:
            ChainError: ``n`` is negative.
        """
        if n < 0:
            raise ChainError(f"advance_blocks refused n={n}: blocks only move forward")
        with self._transaction(write=True) as conn:
            conn.execute("UPDATE chain SET block_offset = block_offset + ?", (n,))
            return self._block_of(self._chain_row(conn))

    def set_weights_version(self, value: int) -> None:
        """The owner raises the subnet's minimum weights version (forces validators to upgrade).

        Raises:
            ChainError: ``value`` is not a u64.
        """
        with self._transaction(write=True) as conn:
            write_weights_version(conn, self._path, value)
        logger.info("chain=local weights_version=%d", value)

    def register(
        self, hotkey: str, *, stake: float = 0.0, validator_permit: bool = False, uid: int | None = None
    ) -> int:
        """Register a hotkey on ``uid`` (default: the lowest free uid); returns the uid.

        Raises:
            ChainError: the hotkey is invalid or registered, the uid is taken, or stake is bad.
        """
        check_neuron(GenesisNeuron(hotkey=hotkey, stake=stake, validator_permit=validator_permit))
        with self._transaction(write=True) as conn:
            taken = {n.uid: n.hotkey for n in _neurons(conn)}
            if hotkey in taken.values():
                raise ChainError(f"register refused hotkey={hotkey}: already registered")
            if uid is None:
                uid = next(u for u in range(len(taken) + 1) if u not in taken)
            if not 0 <= uid <= MAX_UID or uid in taken:
                raise ChainError(
                    f"register refused hotkey={hotkey} uid={uid}: taken or outside [0, {MAX_UID}]"
                )
            block = self._block_of(self._chain_row(conn))
            conn.execute(
                "INSERT INTO neurons VALUES (?, ?, ?, ?, ?)",
                (uid, hotkey, stake, int(validator_permit), block),
            )
        logger.info("chain=local register hotkey=%s uid=%s block=%s", hotkey, uid, block)
        return uid

    def deregister(self, hotkey: str) -> int:
        """Remove a hotkey from the subnet and free its uid; returns that uid.

        Its past writes stay in the ledger's history; it no longer appears in reads.

        Raises:
            ChainError: the hotkey is not registered.
        """
        with self._transaction(write=True) as conn:
            uid = _registered(conn, hotkey, operation="deregister").uid
            conn.execute("DELETE FROM neurons WHERE hotkey = ?", (hotkey,))
        logger.info("chain=local deregister hotkey=%s uid=%s", hotkey, uid)
        return uid

    # ---- internals -----------------------------------------------------------------------

    def _require_keypair(self, operation: str) -> Keypair:
        if self._keypair is None:
            raise ChainError(f"{operation} refused ledger={self._path}: chain opened read-only (no wallet)")
        return self._keypair

    def _block_of(self, row: ChainRow) -> int:
        if row.block_time_s is None:
            return row.block_offset
        elapsed_s = max(0.0, self._clock() - row.genesis_time)
        return row.block_offset + math.floor(elapsed_s / row.block_time_s)

    def _chain_row(self, conn: sqlite3.Connection | None = None) -> ChainRow:
        if conn is None:
            with self._transaction(write=False) as own:
                return self._chain_row(own)
        return read_chain_row(conn, self._path)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One connection, one transaction: IMMEDIATE for writes (serialises writers across
        processes, so read-check-write never races), deferred for reads (a consistent snapshot)."""
        if not self._path.is_file():
            raise ChainError(f"ledger {self._path}: not found; create it with LocalChain.genesis")
        try:
            conn = connect_ledger(self._path)
        except sqlite3.Error as e:
            raise ChainError(f"ledger {self._path}: cannot open: {e}") from e
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise ChainError(f"ledger {self._path}: {'write' if write else 'read'} failed: {e}") from e
        finally:
            conn.close()


def _block_hash(seed: int, block: int) -> str:
    return "0x" + hashlib.sha256(BLOCK_HASH_DOMAIN + struct.pack(">QQ", seed, block)).hexdigest()


def _neurons(conn: sqlite3.Connection) -> list[Neuron]:
    rows = conn.execute(
        "SELECT uid, hotkey, stake, validator_permit, registered_block FROM neurons ORDER BY uid"
    ).fetchall()
    return [
        Neuron(uid=u, hotkey=h, stake=s, validator_permit=bool(p), registered_block=b)
        for u, h, s, p, b in rows
    ]


def _registered(conn: sqlite3.Connection, hotkey: str, *, operation: str) -> Neuron:
    for neuron in _neurons(conn):
        if neuron.hotkey == hotkey:
            return neuron
    raise ChainError(f"{operation} refused hotkey={hotkey}: hotkey is not registered on this subnet")


def _check_rate_limit(
    conn: sqlite3.Connection, *, kind: str, hotkey: str, block: int, limit_blocks: int
) -> None:
    """Like subtensor: a write is allowed when ``block - last_block >= limit_blocks``."""
    last = conn.execute(
        "SELECT block FROM writes WHERE kind = ? AND hotkey = ? ORDER BY seq DESC LIMIT 1", (kind, hotkey)
    ).fetchone()
    if last is None or block - last[0] >= limit_blocks:
        return
    remaining = last[0] + limit_blocks - block
    raise ChainError(
        f"{_OPERATION[kind]} refused hotkey={hotkey} block={block}: {kind} rate limit {limit_blocks} blocks, "
        f"last {kind} at block {last[0]}, {remaining} blocks remain"
    )
