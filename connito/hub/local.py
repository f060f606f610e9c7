"""LocalStore: the embedded checkpoint store, a directory of content-addressed revisions.

Layout: ``root/<namespace>/<name>/<revision>/<file>`` plus a ``.revision.json`` index per
revision. The revision is the sha256 of the canonical (name, content sha256) list of the
uploaded files, so identical uploads share a revision and a reader can recompute it: a revision
someone edited after upload is refused, not served. A revision directory appears in one
``rename``; a crash leaves at most an ignored ``.tmp-*`` directory, never a partial revision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connito.errors import StoreError
from connito.fsutil import fsync_dir
from connito.hub.base import CHECKPOINT_FILES, StoreRef, check_ref, validate_file_names, validate_repo_id

__all__ = ["LocalStore", "LOCAL_KIND", "compute_revision"]

logger = logging.getLogger(__name__)

LOCAL_KIND = "local"
INDEX_NAME = ".revision.json"  # file names must start with a letter or digit, so no clash
INDEX_SCHEMA_VERSION = 1
REVISION_DOMAIN = "connito-local-store/v1"  # domain-separates revision hashes from other sha256s
_CHUNK_BYTES = 1 << 20
_REVISION = re.compile(r"[0-9a-f]{64}")


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _RevisionIndex(BaseModel):
    """What a revision holds; authenticated by recomputing the revision from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(ge=INDEX_SCHEMA_VERSION, le=INDEX_SCHEMA_VERSION)
    files: dict[str, _FileEntry]


def compute_revision(file_digests: dict[str, str]) -> str:
    """The revision of a set of files: sha256 over the sorted (name, content sha256) list.

    Order-free and content-only, so the same files give the same revision on any machine.
    """
    canonical = json.dumps(
        {"domain": REVISION_DOMAIN, "files": sorted(file_digests.items())}, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class LocalStore:
    """A checkpoint store in a local directory, shared by all processes of a localnet.

    The embedded default behind ``--hub local:PATH``: same contract as ``HfHubStore`` (exact
    revisions, size cap before copying, only the requested files), no network.
    """

    kind: str = LOCAL_KIND

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def upload(
        self, folder: Path, *, repo: str, files: tuple[str, ...] = CHECKPOINT_FILES, message: str = ""
    ) -> StoreRef:
        """Store exactly ``files`` from ``folder`` as a revision of ``repo``; returns its ref.

        Files are copied first and hashed from the copies, so the revision always matches what
        was stored even if the source changes during the upload. ``message`` is only logged.

        Raises:
            StoreError: ``refused`` for a bad repo id or file name, ``missing`` for a file not in
                ``folder``, ``error`` for a disk failure.
        """
        validate_repo_id(repo)
        names = validate_file_names(files, repo=repo)
        sources = {name: Path(folder) / name for name in names}
        for name, source in sources.items():
            if not source.is_file():
                raise StoreError(
                    f"local upload repo={repo}: file {name} not found in {folder}",
                    reason="missing",
                    repo=repo,
                )
        repo_dir = self.root / repo
        try:
            repo_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=repo_dir))
            try:
                entries = {name: _copy_hashed(source, staging / name) for name, source in sources.items()}
                revision = compute_revision({name: entry.sha256 for name, entry in entries.items()})
                index = _RevisionIndex(schema_version=INDEX_SCHEMA_VERSION, files=entries)
                _write_synced(staging / INDEX_NAME, index.model_dump_json(indent=2).encode("utf-8"))
                fsync_dir(staging)
                _publish(staging, repo_dir / revision)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
        except OSError as e:
            raise StoreError(f"local upload repo={repo} root={self.root}: {e}", repo=repo) from e
        total_bytes = sum(entry.size for entry in entries.values())
        logger.info(
            "local upload repo=%s rev=%s files=%d bytes=%d message=%r",
            repo,
            revision,
            len(entries),
            total_bytes,
            message,
        )
        return StoreRef(kind=LOCAL_KIND, repo=repo, revision=revision)

    def download(
        self,
        ref: StoreRef,
        dest: Path,
        *,
        max_bytes: int,
        files: tuple[str, ...] = CHECKPOINT_FILES,
    ) -> Path:
        """Copy ``files`` of ``ref`` into ``dest`` and verify them against the revision; returns ``dest``.

        Existence and the total size are checked before a byte is copied; each copy is hashed
        while it is written and must match the revision's index, so a revision edited after
        upload is detected. Nothing lands in ``dest`` unless every file verified.

        Raises:
            StoreError: ``refused`` (bad ref, or content that does not match the revision),
                ``missing`` (repo, revision or file), ``too_large``, ``error`` (disk).
        """
        index = self._read_index(ref)
        names = validate_file_names(files, repo=ref.repo)
        revision_dir = self.root / ref.repo / ref.revision
        sizes = self._sizes_on_disk(ref, revision_dir, index, names)
        total_bytes = sum(sizes.values())
        if total_bytes > max_bytes:
            raise StoreError(
                f"local download repo={ref.repo} rev={ref.revision}: {total_bytes} bytes "
                f"exceeds max_bytes={max_bytes}",
                reason="too_large",
                repo=ref.repo,
                revision=ref.revision,
            )
        dest = Path(dest)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest))
            try:
                for name in names:
                    copied = _copy_hashed(revision_dir / name, staging / name, max_bytes=sizes[name])
                    if copied != index.files[name]:
                        raise _tampered(ref, name)
                for name in names:
                    os.replace(staging / name, dest / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except _SizeExceeded as e:
            raise _tampered(ref, e.name) from e
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(
                f"local download repo={ref.repo} rev={ref.revision} dest={dest}: {e}",
                repo=ref.repo,
                revision=ref.revision,
            ) from e
        logger.info(
            "local download repo=%s rev=%s files=%d bytes=%d", ref.repo, ref.revision, len(names), total_bytes
        )
        return dest

    def list_files(self, ref: StoreRef) -> dict[str, int]:
        """The files of a revision and their sizes in bytes, from its verified index.

        Raises:
            StoreError: ``refused`` (bad ref or tampered index), ``missing``.
        """
        index = self._read_index(ref)
        return {name: entry.size for name, entry in sorted(index.files.items())}

    def prune_revisions(self, repo: str, *, keep_newest: int) -> int:
        """Delete all but the ``keep_newest`` most recently stored revisions of ``repo``.

        The uploader calls it to keep its repo bounded (``connito.node.disk_retention``); a
        revision folder is removed whole, index first, so a concurrent download of it fails as
        ``missing`` rather than reading half a revision. Returns how many were deleted.

        Raises:
            StoreError: ``refused`` for a bad repo id or ``keep_newest`` < 1.
        """
        validate_repo_id(repo)
        if keep_newest < 1:
            raise StoreError(
                f"local prune repo={repo}: keep_newest must be >= 1, got {keep_newest}", reason="refused"
            )
        repo_dir = self.root / repo
        if not repo_dir.is_dir():
            return 0
        revisions = [d for d in repo_dir.iterdir() if d.is_dir() and _REVISION.fullmatch(d.name)]
        revisions.sort(key=lambda d: (d.stat().st_mtime_ns, d.name), reverse=True)
        for old in revisions[keep_newest:]:
            (old / INDEX_NAME).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        return max(0, len(revisions) - keep_newest)

    # -- helpers -------------------------------------------------------------------------------
    def _read_index(self, ref: StoreRef) -> _RevisionIndex:
        """Validate ``ref``, load its index and check the index hashes to the revision."""
        _check_ref(ref)
        repo_dir = self.root / ref.repo
        where = f"local repo={ref.repo} rev={ref.revision}"
        if not repo_dir.is_dir():
            raise StoreError(f"{where}: repo not found in {self.root}", reason="missing", repo=ref.repo)
        index_path = repo_dir / ref.revision / INDEX_NAME
        try:
            raw = index_path.read_bytes()
        except FileNotFoundError as e:
            raise StoreError(
                f"{where}: revision not found", reason="missing", repo=ref.repo, revision=ref.revision
            ) from e
        except OSError as e:
            raise StoreError(f"{where}: {e}", repo=ref.repo, revision=ref.revision) from e
        try:
            index = _RevisionIndex.model_validate_json(raw)
        except ValidationError as e:
            raise StoreError(
                f"{where}: {INDEX_NAME} is malformed ({e.error_count()} errors)",
                reason="refused",
                repo=ref.repo,
                revision=ref.revision,
            ) from e
        digests = {name: entry.sha256 for name, entry in index.files.items()}
        if compute_revision(digests) != ref.revision:
            raise StoreError(
                f"{where}: {INDEX_NAME} does not hash to the revision (tampered)",
                reason="refused",
                repo=ref.repo,
                revision=ref.revision,
            )
        return index

    def _sizes_on_disk(
        self, ref: StoreRef, revision_dir: Path, index: _RevisionIndex, names: tuple[str, ...]
    ) -> dict[str, int]:
        """Sizes of the requested files; every one must be in the index and on disk."""
        sizes: dict[str, int] = {}
        for name in names:
            path = revision_dir / name
            if name not in index.files or not path.is_file():
                raise StoreError(
                    f"local download repo={ref.repo} rev={ref.revision}: file {name} not in revision",
                    reason="missing",
                    repo=ref.repo,
                    revision=ref.revision,
                )
            sizes[name] = path.stat().st_size
        return sizes


class _SizeExceeded(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _check_ref(ref: StoreRef) -> None:
    check_ref(ref, kind=LOCAL_KIND, revision=_REVISION, rule="64 lowercase hex chars")


def _tampered(ref: StoreRef, name: str) -> StoreError:
    return StoreError(
        f"local download repo={ref.repo} rev={ref.revision}: file {name} does not match the revision (tampered)",
        reason="refused",
        repo=ref.repo,
        revision=ref.revision,
    )


def _copy_hashed(source: Path, target: Path, *, max_bytes: int | None = None) -> _FileEntry:
    """Copy ``source`` to ``target`` (fsynced), hashing the bytes as they pass.

    ``max_bytes`` stops a file that grew after its size was checked.
    """
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise _SizeExceeded(source.name)
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return _FileEntry(sha256=digest.hexdigest(), size=size)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` already holds the same content."""
    try:
        os.rename(staging, final)
    except OSError:
        if not (final / INDEX_NAME).is_file():
            raise
        return  # content-addressed: a concurrent or earlier identical upload won the rename
    fsync_dir(final.parent)
