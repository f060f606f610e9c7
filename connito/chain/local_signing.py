"""The bytes and keys behind a local-chain write: what a hotkey signs, how it is signed and checked,
and how a weights payload is encoded.

A signature covers ``signing_message(...)``: fixed-width, length-prefixed fields under a domain
tag, so no signature can be replayed on another subnet, kind, block or payload. Weights travel as
the canonical payload of ``encode_weights`` (sorted ``(uid u16, weight f64)`` entries, normalised
to sum 1); bad values are refused, never repaired. ``create_wallet`` makes offline, unencrypted
wallets for localnet and tests.

May import: connito.errors.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable
from pathlib import Path

import bittensor as bt
from bittensor.sp_core import Keypair
from bittensor.sp_core import verify as sr25519_verify

from connito.errors import ChainError

__all__ = [
    "SIGNING_DOMAIN",
    "create_wallet",
    "decode_weights",
    "encode_weights",
    "hotkey_keypair",
    "sign",
    "signing_message",
    "verify_signature",
]

SIGNING_DOMAIN = b"connito-localchain-v1"  # a local-chain signature is useless anywhere else
_WEIGHT_ENTRY = struct.Struct(">Hd")  # (uid u16, weight f64): exact, canonical, sorted by uid


def signing_message(*, netuid: int, kind: str, block: int, payload: bytes) -> bytes:
    """The canonical bytes a hotkey signs for one write.

    Fixed-width, length-prefixed fields under a domain tag: no two writes (other subnet, other
    kind, other block, other payload) share a message, so a signature cannot be replayed.
    """
    kind_bytes = kind.encode("ascii")
    header = struct.pack(">HQB", netuid, block, len(kind_bytes))
    return SIGNING_DOMAIN + header + kind_bytes + struct.pack(">I", len(payload)) + payload


def verify_signature(*, hotkey: str, message: bytes, signature: bytes) -> None:
    """Check an sr25519 signature against the hotkey's ss58 address, like the chain's runtime.

    Raises:
        ChainError: the signature is malformed or was not made by ``hotkey`` over ``message``.
    """
    try:
        is_valid = bool(sr25519_verify(message, signature, hotkey))
    except ValueError as e:  # wrong length, bad ss58: malformed, so invalid
        raise ChainError(f"write refused hotkey={hotkey}: malformed signature: {e}") from e
    if not is_valid:
        raise ChainError(f"write refused hotkey={hotkey}: bad sr25519 signature over the write")


def sign(keypair: Keypair, message: bytes) -> bytes:
    """The keypair's sr25519 signature over ``message``.

    Raises:
        ChainError: the keypair cannot sign (e.g. it holds only a public key).
    """
    try:
        return bytes(keypair.sign(message))
    except Exception as e:  # a public-only keypair cannot sign; the binding raises its own types
        raise ChainError(f"write refused hotkey={keypair.ss58_address}: cannot sign: {e}") from e


def hotkey_keypair(wallet: bt.Wallet | Keypair | None) -> Keypair | None:
    """The hotkey keypair a wallet writes with (a keypair or None passes through).

    Raises:
        ChainError: the wallet's hotkey file cannot be loaded.
    """
    if wallet is None or isinstance(wallet, Keypair):
        return wallet
    try:
        return wallet.hotkey
    except Exception as e:  # the SDK raises KeyfileError, OSError or ValueError for a bad keyfile
        raise ChainError(f"wallet {wallet.name}/{wallet.hotkey_str}: cannot load hotkey: {e}") from e


def create_wallet(wallets_dir: str | Path, name: str, *, hotkey: str = "default") -> bt.Wallet:
    """Create (or load, if its files exist) an unencrypted bittensor wallet, offline and silent.

    For localnet and tests: no password prompt (there is no stdin) and the mnemonic is never
    printed or logged. A second hotkey under an existing coldkey is added without touching it.
    """
    wallet = bt.Wallet(name=name, hotkey=hotkey, path=str(wallets_dir))
    discard_mnemonic: Callable[[str], None] = lambda _mnemonic: None  # noqa: E731
    if not wallet.coldkeypub_file.exists_on_device():
        wallet.create_new_coldkey(use_password=False, on_mnemonic=discard_mnemonic)
    if not wallet.hotkey_file.exists_on_device():
        wallet.create_new_hotkey(use_password=False, on_mnemonic=discard_mnemonic)
    return wallet


def encode_weights(weights: dict[int, float], *, known_uids: set[int], hotkey: str) -> bytes:
    """Validate and normalise weights into the canonical payload; never repairs bad values.

    Raises:
        ChainError: the weights are empty, non-finite, negative, all zero or name an unknown uid.
    """
    where = f"set_weights refused hotkey={hotkey}"
    if not weights:
        raise ChainError(f"{where}: weights: empty")
    for uid, value in weights.items():
        if isinstance(uid, bool) or not isinstance(uid, int) or uid not in known_uids:
            raise ChainError(f"{where}: uid={uid!r}: not a registered uid")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ChainError(f"{where}: uid={uid}: weight {value!r} is not a finite number")
        if value < 0:
            raise ChainError(f"{where}: uid={uid}: weight {value} is negative")
    total = math.fsum(float(v) for v in weights.values())
    if total <= 0:
        raise ChainError(f"{where}: weights sum to {total}, must be > 0")
    return b"".join(_WEIGHT_ENTRY.pack(uid, float(weights[uid]) / total) for uid in sorted(weights))


def decode_weights(payload: bytes) -> dict[int, float]:
    """The ``{uid: weight}`` map an ``encode_weights`` payload holds."""
    return {uid: weight for uid, weight in _WEIGHT_ENTRY.iter_unpack(payload)}
