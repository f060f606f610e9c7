"""MeteredStore: any CheckpointStore, reporting the bytes each finished transfer moved.

The neuron wraps its store once at startup so bytes up and down reach its metrics without the
stores knowing about metrics. Only transfers that completed count: a refused or failed
download moved nothing into ``dest`` (both stores stage and rename), so there is nothing to
report. Sizes are read from the files on disk, the same bytes the store checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from connito.hub.base import CHECKPOINT_FILES, CheckpointStore, StoreRef

__all__ = ["MeteredStore", "Direction"]

Direction = Literal["upload", "download"]


class MeteredStore:
    """Delegates to ``inner``; calls ``on_bytes(direction, n_bytes)`` after each successful transfer."""

    def __init__(self, inner: CheckpointStore, *, on_bytes: Callable[[Direction, int], None]) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._on_bytes = on_bytes

    def __repr__(self) -> str:
        return f"MeteredStore({self.inner!r})"

    def upload(
        self, folder: Path, *, repo: str, files: tuple[str, ...] = CHECKPOINT_FILES, message: str = ""
    ) -> StoreRef:
        ref = self.inner.upload(folder, repo=repo, files=files, message=message)
        self._on_bytes("upload", _total_bytes(Path(folder), files))
        return ref

    def download(
        self, ref: StoreRef, dest: Path, *, max_bytes: int, files: tuple[str, ...] = CHECKPOINT_FILES
    ) -> Path:
        path = self.inner.download(ref, dest, max_bytes=max_bytes, files=files)
        self._on_bytes("download", _total_bytes(Path(dest), files))
        return path

    def __getattr__(self, name: str):  # noqa: ANN204 - the inner store's other methods (list_files)
        return getattr(self.inner, name)


def _total_bytes(folder: Path, files: tuple[str, ...]) -> int:
    return sum((folder / name).stat().st_size for name in files if (folder / name).is_file())
