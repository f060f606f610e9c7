"""The checkpoint-exchange seam: upload a folder, get an exact revision; download it back.

Two implementations: ``HfHubStore`` (huggingface_hub) and ``LocalStore`` (a directory with
content-addressed revisions). Downloads are pinned to an exact revision and capped in bytes
before any byte is fetched. Neither imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from connito.errors import StoreError

__all__ = [
    "COMMIT_SHA",
    "is_commit_sha",
    "check_ref",
    "StoreRef",
    "CheckpointStore",
    "CHECKPOINT_FILES",
    "MAX_REPO_PART_CHARS",
    "MAX_FILE_NAME_CHARS",
    "validate_repo_id",
    "validate_file_names",
]

CHECKPOINT_FILES: tuple[str, ...] = ("experts.safetensors", "manifest.json")

MAX_REPO_PART_CHARS = 96  # the Hub's limit for a namespace or a repo name
MAX_FILE_NAME_CHARS = 128
# Each part starts and ends with a letter or digit: no ".", "..", leading "/" or "-", no separators.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a Hub (git) commit: the only revision that cannot move


def is_commit_sha(revision: str | None) -> bool:
    """A 40-hex lowercase git commit: the only Hub revision that cannot move after it is read."""
    return revision is not None and COMMIT_SHA.fullmatch(revision) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRef:
    """Where a checkpoint lives: store kind (``hf`` or ``local``), repo id and exact revision."""

    kind: str
    repo: str
    revision: str


@runtime_checkable
class CheckpointStore(Protocol):
    """Upload and download checkpoint folders."""

    kind: str

    def upload(
        self, folder: Path, *, repo: str, files: tuple[str, ...] = CHECKPOINT_FILES, message: str = ""
    ) -> StoreRef:
        """Upload exactly ``files`` from ``folder`` as one new revision of ``repo``.

        Raises:
            StoreError: a file is missing or the store refused the upload.
        """
        ...

    def download(
        self,
        ref: StoreRef,
        dest: Path,
        *,
        max_bytes: int,
        files: tuple[str, ...] = CHECKPOINT_FILES,
    ) -> Path:
        """Download ``files`` of ``ref`` into ``dest``; returns ``dest``.

        Sizes are read from the store's metadata first: if their sum exceeds ``max_bytes``, or a
        file is missing, nothing is fetched. Other files in the repo are never fetched.

        Raises:
            StoreError: missing repo, revision or file; too large; store unreachable.
        """
        ...


def validate_repo_id(repo: str) -> str:
    """Check that ``repo`` is ``namespace/name`` with Hub-safe characters; returns it unchanged.

    Both stores turn repo ids into paths or URLs, and repo ids come from chain commitments that
    miners write, so ``..``, absolute paths and separators are refused before any I/O.

    Raises:
        StoreError: reason ``refused``, naming the repo and the rule.
    """
    parts = repo.split("/") if isinstance(repo, str) else []
    is_valid = (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) and len(part) <= MAX_REPO_PART_CHARS for part in parts)
        and ".." not in repo
        and "--" not in repo
    )
    if not is_valid:
        raise StoreError(
            f"repo id {repo!r}: must be namespace/name of letters, digits, '.', '_', '-' "
            f"(each part 1-{MAX_REPO_PART_CHARS} chars, starting and ending with a letter or digit, no '..' or '--')",
            reason="refused",
            repo=repo if isinstance(repo, str) else None,
        )
    return repo


def validate_file_names(files: Iterable[str], *, repo: str | None = None) -> tuple[str, ...]:
    """Check a list of checkpoint file names: plain names, no separators, no ``..``, no duplicates.

    Checkpoints are flat folders; refusing anything path-like blocks traversal out of the
    destination folder whatever the store does with the name.

    Raises:
        StoreError: reason ``refused``, naming the file and the rule.
    """
    names = tuple(files)
    if not names:
        raise StoreError(f"repo={repo} files: must name at least one file", reason="refused", repo=repo)
    for name in names:
        is_valid = (
            isinstance(name, str)
            and _FILE_NAME.fullmatch(name) is not None
            and len(name) <= MAX_FILE_NAME_CHARS
            and ".." not in name
        )
        if not is_valid:
            raise StoreError(
                f"repo={repo} file {name!r}: must be a plain file name of letters, digits, '.', '_', '-' "
                f"(1-{MAX_FILE_NAME_CHARS} chars, starting with a letter or digit, no '..')",
                reason="refused",
                repo=repo,
            )
    if len(set(names)) != len(names):
        raise StoreError(f"repo={repo} files {names}: names must be unique", reason="refused", repo=repo)
    return names


def check_ref(ref: StoreRef, *, kind: str, revision: re.Pattern[str], rule: str) -> None:
    """Refuse a ref of another store kind, an invalid repo id, or a revision that does not pin content.

    Raises:
        StoreError: reason ``refused``, naming the repo, the revision and the rule.
    """
    where = f"{kind} ref repo={ref.repo} rev={ref.revision!r}"
    if ref.kind != kind:
        raise StoreError(
            f"{where}: kind {ref.kind!r}, expected {kind!r}",
            reason="refused",
            repo=ref.repo,
            revision=ref.revision,
        )
    validate_repo_id(ref.repo)
    if not isinstance(ref.revision, str) or revision.fullmatch(ref.revision) is None:
        raise StoreError(
            f"{where}: revision must be {rule}", reason="refused", repo=ref.repo, revision=str(ref.revision)
        )
