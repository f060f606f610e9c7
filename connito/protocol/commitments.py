"""What nodes publish and agree on besides the clock: commit digests, the evaluation seed, and the
on-chain commitments (commit, reveal, global) with their byte encoding.

Everything here is a pure function of hashes, payloads and bytes: no I/O, no clock, no torch.
Hash preimages are framed (every field length-prefixed), so no two distinct inputs share one.

Commit: a miner binds itself to its weights before the deadline with ``commit_digest(...)`` (the
expert tensors' sha256, hotkey, domain, cycle and global revision; it reveals nothing). Reveal and
global: where a checkpoint lives (store, repo, exact revision) plus a ``short_digest``.
``eval_seed`` turns the hash of ``phases.seed_block(c)`` into the seed every validator samples
held-out data with (see ``connito.protocol.phases`` for why that block).

``decode_commitment`` reads what anyone registered on the subnet wrote: it validates every part,
repairs nothing, and raises only ``CommitmentDecodeError``.

May import: connito.errors.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connito.errors import CommitmentDecodeError, ConfigError

__all__ = [
    "commit_digest",
    "eval_seed_bytes",
    "eval_seed",
    "MAX_COMMITMENT_BYTES",
    "COMMITMENT_PREFIX",
    "COMMITMENT_VERSION",
    "SHORT_DIGEST_BYTES",
    "StoreKind",
    "CommitPayload",
    "RevealPayload",
    "GlobalPayload",
    "Payload",
    "short_digest",
    "max_repo_bytes",
    "encode_commitment",
    "decode_commitment",
]

# Chain commitments (bittensor's Commitments pallet, LocalChain alike) hold at most 128 bytes.
MAX_COMMITMENT_BYTES = 128
COMMITMENT_PREFIX = b"cn"
COMMITMENT_VERSION = 1
_KIND_COMMIT, _KIND_REVEAL, _KIND_GLOBAL = b"C", b"R", b"G"
_HEADER_BYTES = len(COMMITMENT_PREFIX) + 2  # prefix, version byte, kind byte

# Reveal/global digests are sha256 truncated to 128 bits so a 96-char Hub repo id nearly fits.
# 128 bits leave 2**128 work for a second preimage; collisions (2**64) buy nothing here because
# the revision is pinned (immutable content) and the tensors are bound by the full 32-byte
# commit digest, which validators recompute from the downloaded checkpoint.
SHORT_DIGEST_BYTES = 16
_FULL_DIGEST_BYTES = 32
_MAX_U32 = 2**32 - 1

StoreKind = Literal["hf", "local"]
_STORE_CODES: dict[str, int] = {"hf": 0, "local": 1}
_STORE_KINDS: dict[int, str] = {code: kind for kind, code in _STORE_CODES.items()}
_HF_REVISION_HEX = 40  # a git commit sha
_MAX_REVISION_HEX = 64
# One or two segments ("namespace/name"), each starting alphanumeric: no "..", no absolute path.
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HEX_RE = re.compile(r"^[0-9a-f]*$")


# ---------------------------------------------------------------------------------------------
# Canonical hashing


def _frame(*fields: bytes) -> bytes:
    """Length-prefix each field (u32 big-endian), so distinct field lists never share bytes."""
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _u64(value: int, field: str) -> bytes:
    if not 0 <= value < 2**64:
        raise ConfigError(f"must be in [0, 2**64), got {value}", field=field)
    return struct.pack(">Q", value)


def _hex_bytes(value: str, field: str, *, length: int | None = None) -> bytes:
    """Parse hex text (an optional ``0x`` prefix, any case) into raw bytes."""
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if not raw or (length is not None and len(raw) != length) or len(text) != 2 * len(raw):
        size = f"{2 * length} " if length is not None else "an even number of "
        raise ConfigError(f"must be {size}hex chars, got {value!r}", field=field)
    return raw


def commit_digest(
    *,
    domain: str,
    cycle: int,
    global_revision: str,
    hotkey: str,
    tensors_sha256: str,
    format_version: int = 1,
) -> bytes:
    """The 32-byte sha256 a miner commits before the deadline.

    Binding hotkey, domain, cycle and the global revision the miner started from means a commit
    cannot be copied from another miner, replayed from another cycle or subnet, or computed
    against a stale global state. Fields are length-prefixed, so no two distinct inputs produce
    the same preimage.

    Raises:
        ConfigError: ``tensors_sha256`` is not 64 hex chars, or ``cycle``/``format_version`` is
            out of range.
    """
    preimage = _frame(
        b"connito.commit",
        _u64(format_version, "format_version"),
        domain.encode("utf-8"),
        _u64(cycle, "cycle"),
        global_revision.encode("utf-8"),
        hotkey.encode("utf-8"),
        _hex_bytes(tensors_sha256, "tensors_sha256", length=_FULL_DIGEST_BYTES),
    )
    return hashlib.sha256(preimage).digest()


def eval_seed_bytes(*, seed_block_hash: str, domain: str, cycle: int) -> bytes:
    """sha256 over (seed block hash, domain, cycle): 32 bytes every validator agrees on.

    ``seed_block_hash`` is the hex hash (``0x`` optional) of ``seed_block(cycle)``. Mixing in the
    domain and cycle keeps two subnets, or two cycles that share a hash, on different samples.

    Raises:
        ConfigError: the block hash is not hex, or ``cycle`` is out of range.
    """
    preimage = _frame(
        b"connito.eval_seed",
        _hex_bytes(seed_block_hash, "seed_block_hash"),
        domain.encode("utf-8"),
        _u64(cycle, "cycle"),
    )
    return hashlib.sha256(preimage).digest()


def eval_seed(*, seed_block_hash: str, domain: str, cycle: int) -> int:
    """The evaluation seed as an unsigned 64-bit int (first 8 bytes of ``eval_seed_bytes``).

    Fits ``torch.Generator.manual_seed``, ``random.Random`` and ``numpy.random.default_rng``.

    Raises:
        ConfigError: as ``eval_seed_bytes``.
    """
    digest = eval_seed_bytes(seed_block_hash=seed_block_hash, domain=domain, cycle=cycle)
    return int.from_bytes(digest[:8], "big")


# ---------------------------------------------------------------------------------------------
# On-chain commitments
#
# Wire format, all integers big-endian:
#   header  = b"cn" | version u8 | kind u8 (b"C" commit, b"R" reveal, b"G" global)
#   commit  = header | cycle u32 | digest[32]
#   reveal  = header | cycle u32 | store u8 (0 hf, 1 local) | rev_len u8 | rev[rev_len]
#             | digest[16] | repo_len u8 | repo (utf-8)[repo_len]
#   global  = same as reveal
# rev is the hex revision packed as raw bytes (a 40-hex git sha takes 20 bytes).


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cycle: int = Field(ge=0, le=_MAX_U32)


class CommitPayload(_Payload):
    """A miner's commit: the cycle and its 32-byte ``commit_digest``."""

    digest: bytes = Field(min_length=_FULL_DIGEST_BYTES, max_length=_FULL_DIGEST_BYTES)


class _LocationPayload(_Payload):
    """Where a checkpoint lives: store kind, repo id and exact (hex) revision."""

    store_kind: StoreKind
    repo: str = Field(min_length=1)
    revision: str = Field(min_length=2, max_length=_MAX_REVISION_HEX)

    @model_validator(mode="after")
    def _check_location(self) -> _LocationPayload:
        if not _REPO_RE.match(self.repo) or ".." in self.repo:
            raise ValueError(f"repo must be [namespace/]name of [A-Za-z0-9._-], got {self.repo!r}")
        if not _HEX_RE.match(self.revision) or len(self.revision) % 2:
            raise ValueError(f"revision must be even-length lowercase hex, got {self.revision!r}")
        if self.store_kind == "hf" and len(self.revision) != _HF_REVISION_HEX:
            raise ValueError(f"hf revision must be a 40-hex commit sha, got {self.revision!r}")
        return self


class RevealPayload(_LocationPayload):
    """A miner's reveal after the commit deadline; ``manifest_digest`` is ``short_digest``."""

    manifest_digest: bytes = Field(min_length=SHORT_DIGEST_BYTES, max_length=SHORT_DIGEST_BYTES)


class GlobalPayload(_LocationPayload):
    """The lead validator's published global state; ``record_digest`` is ``short_digest``."""

    record_digest: bytes = Field(min_length=SHORT_DIGEST_BYTES, max_length=SHORT_DIGEST_BYTES)


Payload = CommitPayload | RevealPayload | GlobalPayload


def short_digest(full: bytes | str) -> bytes:
    """Truncate a sha256 (32 raw bytes or 64 hex chars) to the 16 bytes a reveal carries.

    Raises:
        ConfigError: ``full`` is not a sha256.
    """
    raw = full if isinstance(full, bytes) else _hex_bytes(full, "digest", length=_FULL_DIGEST_BYTES)
    if len(raw) != _FULL_DIGEST_BYTES:
        raise ConfigError(f"must be a 32-byte sha256, got {len(raw)} bytes", field="digest")
    return raw[:SHORT_DIGEST_BYTES]


def max_repo_bytes(revision_hex_chars: int = _HF_REVISION_HEX) -> int:
    """Longest repo id (utf-8 bytes) a reveal or global commitment fits with such a revision.

    81 with a Hub commit sha (40 hex), 69 with a 64-hex local revision. A miner checks its repo
    id against this at start, not at reveal time.
    """
    fixed = 4 + 1 + 1 + SHORT_DIGEST_BYTES + 1  # cycle, store, revision length, digest, repo length
    return MAX_COMMITMENT_BYTES - _HEADER_BYTES - fixed - (revision_hex_chars + 1) // 2


def _encode_location(payload: _LocationPayload, digest: bytes) -> bytes:
    revision = bytes.fromhex(payload.revision)
    repo = payload.repo.encode("utf-8")
    head = struct.pack(">IBB", payload.cycle, _STORE_CODES[payload.store_kind], len(revision))
    head += revision + digest
    room = max_repo_bytes(len(payload.revision))
    if len(repo) > room:
        raise ConfigError(
            f"{len(repo)} bytes ({payload.repo!r}), at most {room} fit in a {MAX_COMMITMENT_BYTES}-byte "
            f"commitment with a {len(payload.revision)}-hex revision",
            field="repo",
        )
    return head + bytes([len(repo)]) + repo


def encode_commitment(payload: Payload) -> bytes:
    """Pack a payload into the bytes a node commits on chain (at most 128).

    Raises:
        ConfigError: the encoding exceeds ``MAX_COMMITMENT_BYTES`` (a repo id too long).
    """
    if isinstance(payload, CommitPayload):
        kind, body = _KIND_COMMIT, struct.pack(">I", payload.cycle) + payload.digest
    elif isinstance(payload, RevealPayload):
        kind, body = _KIND_REVEAL, _encode_location(payload, payload.manifest_digest)
    elif isinstance(payload, GlobalPayload):
        kind, body = _KIND_GLOBAL, _encode_location(payload, payload.record_digest)
    else:
        raise ConfigError(f"not a commitment payload: {type(payload).__name__}", field="payload")
    data = COMMITMENT_PREFIX + bytes([COMMITMENT_VERSION]) + kind + body
    assert len(data) <= MAX_COMMITMENT_BYTES, "budget checked per kind"
    return data


class _Reader:
    """Consume bytes front to back; any shortfall is a ``CommitmentDecodeError``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int, what: str) -> bytes:
        chunk = self.data[self.offset : self.offset + count]
        if len(chunk) != count:
            raise _decode_error(self.data, f"truncated: {what} needs {count} bytes at offset {self.offset}")
        self.offset += count
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise _decode_error(self.data, f"{len(self.data) - self.offset} trailing bytes")


def _decode_error(data: bytes, reason: str) -> CommitmentDecodeError:
    return CommitmentDecodeError(f"commitment ({len(data)} bytes, starts {data[:4].hex() or '-'}): {reason}")


def _decode_location(reader: _Reader) -> dict[str, object]:
    cycle = reader.u32("cycle")
    store_code = reader.u8("store kind")
    if store_code not in _STORE_KINDS:
        raise _decode_error(reader.data, f"unknown store kind {store_code}")
    revision = reader.take(reader.u8("revision length"), "revision").hex()
    digest = reader.take(SHORT_DIGEST_BYTES, "digest")
    repo_bytes = reader.take(reader.u8("repo length"), "repo")
    try:
        repo = repo_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise _decode_error(reader.data, "repo is not valid utf-8") from None
    return {
        "cycle": cycle,
        "store_kind": _STORE_KINDS[store_code],
        "repo": repo,
        "revision": revision,
        "digest": digest,
    }


def decode_commitment(data: bytes) -> Payload:
    """Parse a chain commitment; every part is validated, nothing is repaired.

    The only exception it raises is ``CommitmentDecodeError``: commitments are written by anyone
    registered on the subnet, so a neuron skips what it cannot read and goes on.

    Raises:
        CommitmentDecodeError: not bytes, too long, foreign prefix, unknown version or kind,
            truncated, trailing bytes, bad utf-8, or a field that breaks its rule.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CommitmentDecodeError(f"commitment: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_COMMITMENT_BYTES:
        raise _decode_error(data, f"longer than {MAX_COMMITMENT_BYTES} bytes")
    reader = _Reader(data)
    if reader.take(len(COMMITMENT_PREFIX), "prefix") != COMMITMENT_PREFIX:
        raise _decode_error(data, f"foreign prefix, expected {COMMITMENT_PREFIX!r}")
    version = reader.u8("version")
    if version != COMMITMENT_VERSION:
        raise _decode_error(data, f"unknown version {version}, expected {COMMITMENT_VERSION}")
    kind = reader.take(1, "kind")
    try:
        if kind == _KIND_COMMIT:
            cycle = reader.u32("cycle")
            payload: Payload = CommitPayload(cycle=cycle, digest=reader.take(_FULL_DIGEST_BYTES, "digest"))
        elif kind in (_KIND_REVEAL, _KIND_GLOBAL):
            fields = _decode_location(reader)
            digest = fields.pop("digest")
            if kind == _KIND_REVEAL:
                payload = RevealPayload.model_validate({**fields, "manifest_digest": digest})
            else:
                payload = GlobalPayload.model_validate({**fields, "record_digest": digest})
        else:
            raise _decode_error(data, f"unknown kind {kind!r}")
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        raise _decode_error(data, f"{where}: {err['msg'].replace('Value error, ', '')}") from None
    reader.finish()
    return payload
