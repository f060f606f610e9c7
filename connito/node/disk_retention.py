"""Bounded disks: a neuron keeps the files of its last ``keep_cycles`` cycles and no more.

Every cycle a miner writes a checkpoint and pulls a global, a validator saves a global and a
decision record, and both upload to the store; run unattended for weeks, that is one payload per
cycle, forever. At the first block of each cycle the node deletes what belongs to cycles older
than ``current - keep_cycles``. Never deleted: the global the node holds now (its workdir is its
restart point), anything of the last ``keep_cycles`` cycles, anything not named by a cycle
number. Deletion goes folder by folder; a crash in the middle leaves whole older folders, which
the next cycle deletes.

May import: connito.hub (the local store), connito.node.validator_state.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from connito.hub.base import CheckpointStore
from connito.hub.local import LocalStore
from connito.node.context import NodeContext
from connito.node.validator_state import ValidatorState

__all__ = ["Retention", "prune_cycle_folders", "prune_results", "prune_store", "workdir_bytes"]

logger = logging.getLogger(__name__)


@dataclass
class Retention:
    """Runs the pruning once per cycle, at the first tick the node sees of it."""

    ctx: NodeContext
    last_cycle: int | None = None

    def at_cycle(self, cycle: int, *, global_cycle: int, state: ValidatorState | None = None) -> bool:
        """Prune what is older than the last ``ctx.keep_cycles`` cycles (once per cycle).

        ``global_cycle`` is the global the node holds (never pruned). Returns True when
        ``state``'s results changed and the caller must persist it.
        """
        keep = self.ctx.keep_cycles
        if keep is None or cycle < 0 or cycle == self.last_cycle:
            return False
        self.last_cycle = cycle
        workdir = self.ctx.workdir
        prune_cycle_folders(workdir / "checkpoints", current_cycle=cycle, keep_cycles=keep)
        prune_cycle_folders(workdir / "cycles", current_cycle=cycle, keep_cycles=keep)
        protect = frozenset({global_cycle})
        prune_cycle_folders(workdir / "global", current_cycle=cycle, keep_cycles=keep, protect=protect)
        prune_store(self.ctx.store, self.ctx.hub_repo, keep_cycles=keep)
        return state is not None and prune_results(state, current_cycle=cycle, keep_cycles=keep)


def _cycle_of(path: Path) -> int | None:
    """The cycle a per-cycle entry belongs to: ``12``, ``12.json`` or ``global-12``; else None."""
    name = path.name.removesuffix(".json").removeprefix("global-")
    return int(name) if name.isdigit() else None


def prune_cycle_folders(
    root: Path, *, current_cycle: int, keep_cycles: int, protect: frozenset[int] = frozenset()
) -> list[str]:
    """Delete the entries of ``root`` named by a cycle older than the last ``keep_cycles``.

    ``protect`` names cycles that must survive anyway (the global the node holds). Returns the
    names deleted, for one INFO line.
    """
    if not root.is_dir():
        return []
    oldest_kept = current_cycle - keep_cycles + 1
    deleted = []
    for entry in sorted(root.iterdir()):
        cycle = _cycle_of(entry)
        if cycle is None or cycle >= oldest_kept or cycle in protect:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        deleted.append(entry.name)
    if deleted:
        logger.info("pruned %s cycles=%s keep_cycles=%d", root, ",".join(deleted), keep_cycles)
    return deleted


def prune_results(state: ValidatorState, *, current_cycle: int, keep_cycles: int) -> bool:
    """Drop a validator's per-cycle results older than the last ``keep_cycles``; True if any went.

    EMA and the adopted global cycle are kept: they are the state a restart needs.
    """
    oldest_kept = current_cycle - keep_cycles + 1
    old = [cycle for cycle in state.results if cycle < oldest_kept]
    for cycle in old:
        del state.results[cycle]
    return bool(old)


def prune_store(store: CheckpointStore, repo: str, *, keep_cycles: int) -> int:
    """Keep the newest ``keep_cycles`` revisions of this node's own repo in a local store.

    A node uploads one revision per cycle (a miner's submission, the lead's global), so the
    newest ``keep_cycles`` revisions are those of its last ``keep_cycles`` cycles.

    Only the embedded ``LocalStore`` is pruned: it is this machine's disk. A Hugging Face repo's
    history is the Hub's storage and a public record, and is left alone.
    """
    inner = getattr(store, "inner", store)  # a MeteredStore wraps the real one
    if not isinstance(inner, LocalStore):
        return 0
    return inner.prune_revisions(repo, keep_newest=keep_cycles)


def workdir_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (what an operator's ``du`` would count)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
