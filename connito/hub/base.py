"""The checkpoint-exchange seam: upload a folder, get an exact revision; download it back.

Two implementations: ``HfHubStore`` (huggingface_hub) and ``LocalStore`` (a directory with
content-addressed revisions). Downloads are pinned to an exact revision and capped in bytes
before any byte is fetched. Neither imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["StoreRef", "CheckpointStore", "CHECKPOINT_FILES"]

CHECKPOINT_FILES: tuple[str, ...] = ("experts.safetensors", "manifest.json")


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
