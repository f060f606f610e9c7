"""Cycle phases: which cycle and phase a block is in, each phase's block range, the commit
deadline and the seed block.

Everything here is a pure function of block numbers and config: no I/O, no clock, no torch.
Every node computes the same answers from the same chain, so nobody asks a server what phase it is.

The cycle. Cycle ``c`` starts at ``genesis_block + c * cycle_blocks`` and is five phases, back to
back, in this order (lengths from ``CycleConfig``)::

    train -> commit -> reveal -> evaluate -> merge

Miners train, then commit ``commit_digest(...)`` (``connito.protocol.commitments``: it binds the
expert tensors' sha256, hotkey, domain, cycle and global revision, but reveals nothing). The commit
deadline is the last block of the commit phase. Then miners reveal where their checkpoint lives
(store, repo, exact revision), validators evaluate, and the lead validator merges and publishes
the new global state.

Why the seed comes from the block after the commit deadline: validators pick held-out data with
``eval_seed(seed_block_hash=hash(seed_block(c)), ...)``. That block does not exist while commits are
still accepted, so a miner cannot know which data it will be scored on when it binds itself to its
weights, and cannot overfit to the sample. Every validator reads the same block hash, so all score
on the same sample.

Blocks before ``genesis_block`` belong to no cycle: ``phase`` returns ``phase="pending"`` with
``cycle=-1`` (a neuron started early just waits) rather than raising.

May import: connito.config, connito.errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from connito.config import CycleConfig
from connito.errors import ConfigError

__all__ = [
    "PHASES",
    "PENDING",
    "PhaseName",
    "PhaseInfo",
    "phase",
    "cycle_start",
    "phase_bounds",
    "commit_deadline",
    "seed_block",
]

logger = logging.getLogger(__name__)

PhaseName = Literal["pending", "train", "commit", "reveal", "evaluate", "merge"]
PHASES: tuple[PhaseName, ...] = ("train", "commit", "reveal", "evaluate", "merge")
PENDING: PhaseName = "pending"


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseInfo:
    """Where a block sits: its cycle, its phase and that phase's inclusive block range."""

    cycle: int  # -1 before genesis
    phase: PhaseName  # one of PHASES, or PENDING before genesis
    first_block: int
    last_block: int
    blocks_left: int  # last_block - block: 0 on the phase's last block


def _phase_lengths(cycle_cfg: CycleConfig) -> tuple[int, ...]:
    return (
        cycle_cfg.train_blocks,
        cycle_cfg.commit_blocks,
        cycle_cfg.reveal_blocks,
        cycle_cfg.evaluate_blocks,
        cycle_cfg.merge_blocks,
    )


def _check_cycle_index(cycle_index: int) -> None:
    if cycle_index < 0:
        raise ConfigError(f"must be >= 0, got {cycle_index}", field="cycle")


def cycle_start(cycle_index: int, cycle_cfg: CycleConfig) -> int:
    """First block of cycle ``cycle_index``.

    Raises:
        ConfigError: ``cycle_index`` is negative.
    """
    _check_cycle_index(cycle_index)
    return cycle_cfg.genesis_block + cycle_index * cycle_cfg.cycle_blocks


def phase_bounds(cycle_index: int, phase_name: str, cycle_cfg: CycleConfig) -> tuple[int, int]:
    """Inclusive ``(first, last)`` blocks of one phase of one cycle.

    Raises:
        ConfigError: unknown phase name or negative cycle.
    """
    if phase_name not in PHASES:
        raise ConfigError(f"unknown phase {phase_name!r}, expected one of {PHASES}", field="phase")
    first = cycle_start(cycle_index, cycle_cfg)
    for name, length in zip(PHASES, _phase_lengths(cycle_cfg), strict=True):
        if name == phase_name:
            return first, first + length - 1
        first += length
    raise AssertionError("unreachable: phase_name is in PHASES")


def commit_deadline(cycle_index: int, cycle_cfg: CycleConfig) -> int:
    """Last block at which a commit counts for the cycle: the commit phase's last block."""
    return phase_bounds(cycle_index, "commit", cycle_cfg)[1]


def seed_block(cycle_index: int, cycle_cfg: CycleConfig) -> int:
    """The block whose hash seeds evaluation: the first block after the commit deadline.

    It is also the first block of the reveal phase, so it cannot be known by anyone while
    commits still count.
    """
    return commit_deadline(cycle_index, cycle_cfg) + 1


def phase(block: int, cycle_cfg: CycleConfig) -> PhaseInfo:
    """The cycle and phase a block belongs to.

    Blocks before ``genesis_block`` return ``PhaseInfo(cycle=-1, phase="pending", ...)`` spanning
    ``[0, genesis_block - 1]``, so neurons started early wait instead of crashing.

    Raises:
        ConfigError: ``block`` is negative.
    """
    if block < 0:
        raise ConfigError(f"must be >= 0, got {block}", field="block")
    if block < cycle_cfg.genesis_block:
        last = cycle_cfg.genesis_block - 1
        return PhaseInfo(cycle=-1, phase=PENDING, first_block=0, last_block=last, blocks_left=last - block)
    cycle_index, offset = divmod(block - cycle_cfg.genesis_block, cycle_cfg.cycle_blocks)
    first = block - offset
    for name, length in zip(PHASES, _phase_lengths(cycle_cfg), strict=True):
        if offset < length:
            last = first + length - 1
            return PhaseInfo(
                cycle=cycle_index, phase=name, first_block=first, last_block=last, blocks_left=last - block
            )
        offset -= length
        first += length
    raise AssertionError("unreachable: offset < cycle_blocks")
