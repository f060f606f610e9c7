"""Crash-safe file writes: every piece of durable state goes through ``atomic_write``.

A reader sees either the old file or the new one, never half of either: write a temp file in the
same directory, fsync it, rename over the target, fsync the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "fsync_dir", "keep_newest", "sweep_temp_files", "touch"]


def fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where the OS cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync dir)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def sweep_temp_files(root: Path) -> list[Path]:
    """Remove what a killed writer left under ``root``; returns what was removed.

    ``atomic_write`` temp files (``.NAME.*.tmp``) and store staging folders (``.tmp-*``) are only
    ever complete once renamed, so after a ``kill -9`` they are garbage. Call it on a folder that
    only this process writes (a node's workdir), at start, before anything else writes there.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
        elif path.is_dir() and path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``atomic_write`` of canonical, human-readable JSON."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def touch(path: Path) -> None:
    """Mark ``path`` as just used (its mtime), so ``keep_newest`` keeps what is read, not only written."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves; it is only evicted earlier


def keep_newest(folder: Path, *, keep: int, pattern: str = "*") -> list[Path]:
    """Delete all but the ``keep`` most recently used entries of ``folder`` matching ``pattern``.

    A cache keyed by content (tokens, tokenizers) gains an entry whenever its input changes and
    would otherwise grow for as long as a node runs. Returns what was deleted; an entry that
    vanishes or cannot be deleted meanwhile is skipped (another process may share the cache).
    """
    if not folder.is_dir():
        return []
    entries = []
    for entry in folder.glob(pattern):
        try:
            entries.append((entry.stat().st_mtime, entry.name, entry))
        except OSError:
            continue
    entries.sort(reverse=True)
    deleted: list[Path] = []
    for _, _, entry in entries[keep:]:
        try:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        deleted.append(entry)
    return deleted
