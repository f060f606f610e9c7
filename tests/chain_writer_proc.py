"""A separate writer process for LocalChain's multi-process tests (run as a script, not collected).

Usage:
    python tests/chain_writer_proc.py LEDGER URI COUNT commit
        COUNT times: advance the chain one block, then commit ``URI:i`` as URI's hotkey.
    python tests/chain_writer_proc.py LEDGER URI 0 crash
        Open a write transaction, write a commitment row and move the clock, then die without
        committing (``os._exit``), as a process killed mid-write would.
"""

from __future__ import annotations

import os
import sys

from bittensor.sp_core import Keypair

from connito.chain.local import LocalChain

__all__ = ["main"]

CRASH_EXIT_CODE = 3


def _write_commitments(chain: LocalChain, uri: str, count: int) -> None:
    for i in range(count):
        chain.advance_blocks(1)
        chain.commit(f"{uri}:{i}".encode())


def _crash_mid_write(chain: LocalChain) -> None:
    with chain._transaction(write=True) as conn:
        conn.execute(
            "INSERT INTO writes (kind, hotkey, uid, block, payload, signature) VALUES (?, ?, ?, ?, ?, ?)",
            ("commitment", chain.hotkey, 0, 0, b"half-written", b"\x00" * 64),
        )
        conn.execute("UPDATE chain SET block_offset = block_offset + 1000")
        os._exit(CRASH_EXIT_CODE)  # no COMMIT, no cleanup: the OS drops the process mid-transaction


def main(argv: list[str]) -> int:
    ledger, uri, count, mode = argv
    chain = LocalChain.open(ledger, wallet=Keypair.create_from_uri(uri))
    if mode == "commit":
        _write_commitments(chain, uri, int(count))
    elif mode == "crash":
        _crash_mid_write(chain)
    else:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
