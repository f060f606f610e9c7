"""Each localnet validator's private evaluation documents: fresh problems from a secret seed.

On a real subnet a validator brings its own evaluation files (``--eval.private-data``); the
localnet makes them the way a validator of a generated domain could: the domain's own generator
run from a seed drawn from ``os.urandom`` and kept in the validator's folder, so the documents
are from the domain's distribution but in no public source and in no miner's hands.

May import: connito.config, connito.data, connito.fsutil.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from connito.config import DomainConfig
from connito.data import generate_documents
from connito.fsutil import atomic_write

__all__ = ["PRIVATE_DOCUMENTS", "private_eval_file", "write_private_eval"]

PRIVATE_DOCUMENTS = 1500  # ~600 blocks of 256 tokens of math: far more than one cycle's sample


def private_eval_file(workdir: Path, name: str) -> Path:
    return workdir / "private" / f"{name}.jsonl"


def write_private_eval(workdir: Path, config: DomainConfig, names: list[str]) -> bool:
    """Write each validator's file (once per workdir); False when the domain has no seeded generator."""
    seeded = [s for s in config.data.train if s.kind == "generated" and s.name == "math"]
    if not seeded:
        return False
    for name in names:
        path = private_eval_file(workdir, name)
        if path.exists():
            continue
        seed = int.from_bytes(os.urandom(4), "big") + 1  # seed 0 made the public documents
        documents = generate_documents(seeded[0].name, max_documents=PRIVATE_DOCUMENTS, seed=seed)
        atomic_write(path, "".join(json.dumps({"text": doc}) + "\n" for doc in documents).encode())
    return True
