"""Seeded batch streams over packed blocks.

Validators' samples (``sample_batches``) order blocks by ``sha256(seed, round, index)``: the order is
fixed by the hash function alone, so every validator on every machine and library version draws
the same batches from the same evaluation seed. Miners' loaders (``cycle_batches``,
``mixture_batches``) only need to be reproducible locally and use numpy's PCG64 seeded from a hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from connito.errors import ConfigError

__all__ = ["seeded_order", "seeded_rng", "sample_batches", "cycle_batches", "mixture_batches"]


def _seed_bytes(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()


def seeded_rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by a hash of ``parts`` (any ints or strings, negative or huge)."""
    return np.random.default_rng(int.from_bytes(_seed_bytes(*parts), "big"))


def seeded_order(n: int, *parts: object) -> np.ndarray:
    """A permutation of ``range(n)``: indices sorted by ``sha256(parts, index)``; (n,) int64."""
    prefix = "\x1f".join(str(part) for part in parts)
    keys = [hashlib.sha256(f"{prefix}\x1f{i}".encode()).digest()[:8] for i in range(n)]
    return np.asarray(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def sample_batches(
    blocks: torch.Tensor, *, seed: int, num_batches: int, batch_size: int, salt: str
) -> list[torch.Tensor]:
    """``num_batches`` batches of ``(batch_size, T)`` blocks drawn by ``seeded_order``.

    Blocks are drawn without replacement; when more are asked than exist, the next pass uses a
    fresh order, so each block appears at most once more than any other.

    Raises:
        ConfigError: ``blocks`` is empty or a count is < 1.
    """
    _check_counts(len(blocks), num_batches=num_batches, batch_size=batch_size, what=salt)
    need = num_batches * batch_size
    passes = -(-need // len(blocks))
    order = np.concatenate([seeded_order(len(blocks), salt, seed, p) for p in range(passes)])[:need]
    return [
        blocks[torch.from_numpy(order[i * batch_size : (i + 1) * batch_size])] for i in range(num_batches)
    ]


def cycle_batches(
    blocks: torch.Tensor, *, batch_size: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """An endless stream of ``(batch_size, T)`` batches; every block once per pass, reshuffled per pass.

    A batch may straddle two passes, so no block is ever skipped, even with fewer blocks than
    ``batch_size``.
    """
    pending = np.zeros(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(len(blocks))])
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield blocks[torch.from_numpy(batch)]


def mixture_batches(
    parts: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[torch.Tensor]:
    """An endless stream of batches whose rows come from ``parts`` in proportion to ``weights``.

    Each row picks its part by weight, then takes that part's next block from its own reshuffled
    pass, so within a part every block is seen before any repeats.
    """
    names = sorted(parts)
    probabilities = np.asarray([weights[name] for name in names], dtype=np.float64)
    probabilities /= probabilities.sum()
    streams = {name: cycle_batches(parts[name], batch_size=1, rng=rng) for name in names}
    while True:
        picks = rng.choice(len(names), size=batch_size, p=probabilities)
        yield torch.cat([next(streams[names[k]]) for k in picks])


def _check_counts(available: int, *, num_batches: int, batch_size: int, what: str) -> None:
    if available == 0:
        raise ConfigError(f"no {what} blocks: too little text for one sequence", field="data")
    if num_batches < 1:
        raise ConfigError(f"must be >= 1, got {num_batches}", field="num_batches")
    if batch_size < 1:
        raise ConfigError(f"must be >= 1, got {batch_size}", field="batch_size")
