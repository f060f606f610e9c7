"""HfHubStore: checkpoints on the Hugging Face Hub, through huggingface_hub's public API.

Rules it keeps: uploads send exactly the named files and return the commit sha they created;
downloads accept only a 40-hex commit sha (a branch or tag can move between commit and
evaluation), read file sizes from the Hub's metadata and refuse before fetching a byte when a
file is missing or the total exceeds the cap, and never fetch any other file of the repo.
Every huggingface_hub or transport exception leaves as a one-line ``StoreError``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import parse_ratelimit_headers

from connito.errors import ConfigError, StoreError
from connito.hub.base import (
    CHECKPOINT_FILES,
    COMMIT_SHA,
    StoreRef,
    check_ref,
    is_commit_sha,
    validate_file_names,
    validate_repo_id,
)

__all__ = ["HfHubStore", "HF_KIND", "DEFAULT_ENDPOINT"]

logger = logging.getLogger(__name__)

HF_KIND = "hf"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 300  # the longest Retry-After a node honours (seconds)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Errors that call for a retry: the request may not have reached the Hub, or the Hub was busy.
_TRANSPORT_ERRORS = (httpx2.TransportError, OfflineModeIsEnabled)
_MAPPED_ERRORS = (
    HfHubHTTPError,
    EntryNotFoundError,
    httpx2.HTTPError,
    OfflineModeIsEnabled,
    ValueError,
    OSError,
)

T = TypeVar("T")


class HfHubStore:
    """Checkpoint store on a Hugging Face Hub (huggingface.co or any Hub-API ``endpoint``).

    The token comes only from the constructor: ``token=None`` means anonymous, never a token
    that huggingface_hub would otherwise pick up from the environment or a login file.
    Retries: every request is retried by exactly one layer. Requests huggingface_hub retries
    itself go through its own backoff and are not wrapped again (the preupload and LFS/Xet
    transfer of an upload, tree listings, and the file GET's connection errors and 408/429);
    connito retries only what huggingface_hub sends once (``create_repo``, ``paths-info``, the
    small final commit request, a file GET's 5xx): ``max_retries`` times, one WARNING line per
    retried failure, waiting what the Hub asked for (``Retry-After`` or ``RateLimit`` headers,
    read with huggingface_hub's parser) else exponential backoff from ``backoff_s``. The last
    failure leaves as a ``StoreError``.
    """

    kind: str = HF_KIND

    def __init__(
        self,
        *,
        token: str | None,
        endpoint: str | None = None,
        private: bool = False,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0:
            raise ConfigError(f"must be >= 0, got {max_retries}", field="hub.max_retries")
        if backoff_s < 0:
            raise ConfigError(f"must be >= 0, got {backoff_s}", field="hub.backoff_s")
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.private = private
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        # token=False tells huggingface_hub not to look for a token of its own.
        self._token: str | bool = token if token else False
        self._api = HfApi(endpoint=self.endpoint, token=self._token)

    @classmethod
    def from_env(cls, *, private: bool = False, environ: Mapping[str, str] | None = None) -> HfHubStore:
        """Build a store from ``HF_TOKEN`` and ``HF_ENDPOINT``, read once, here and nowhere else.

        Neurons call this at startup; library code receives the store already built.
        """
        env = os.environ if environ is None else environ
        return cls(
            token=env.get("HF_TOKEN") or None, endpoint=env.get("HF_ENDPOINT") or None, private=private
        )

    def __repr__(self) -> str:
        # Never show the token.
        return f"HfHubStore(endpoint={self.endpoint!r}, private={self.private}, authenticated={bool(self._token)})"

    # -- upload --------------------------------------------------------------------------------
    def upload(
        self, folder: Path, *, repo: str, files: tuple[str, ...] = CHECKPOINT_FILES, message: str = ""
    ) -> StoreRef:
        """Commit exactly ``files`` from ``folder`` to ``repo`` (created if needed); returns the commit.

        The returned revision is the commit sha the Hub reports for this commit (or, when the
        files are byte-identical to the branch head, the head's sha: the Hub skips empty commits).

        Raises:
            StoreError: ``refused`` (bad repo id or file name, no write access), ``missing``
                (a file not in ``folder``), ``unreachable``, ``error``.
        """
        validate_repo_id(repo)
        names = validate_file_names(files, repo=repo)
        paths = {name: Path(folder) / name for name in names}
        for name, path in paths.items():
            if not path.is_file():
                raise StoreError(
                    f"hf upload repo={repo}: file {name} not found in {folder}", reason="missing", repo=repo
                )
        self._call(
            "create_repo",
            repo,
            None,
            lambda: self._api.create_repo(repo, repo_type="model", private=self.private, exist_ok=True),
        )
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in paths.items()
        ]
        # The bytes go up once, under huggingface_hub's own backoff; a retried commit below only
        # re-sends the commit request (large files are referenced by hash, not sent again).
        self._call(
            "preupload",
            repo,
            None,
            lambda: self._api.preupload_lfs_files(repo, operations, repo_type="model"),
        )

        def commit() -> str:
            info = self._api.create_commit(
                repo,
                operations,
                commit_message=message or f"connito upload {len(names)} files",
                repo_type="model",
            )
            return str(info.oid)

        revision = self._call("commit", repo, None, commit)
        if not is_commit_sha(revision):
            raise StoreError(
                f"hf upload repo={repo}: Hub returned commit id {revision!r}, expected 40 hex chars",
                repo=repo,
            )
        total_bytes = sum(path.stat().st_size for path in paths.values())
        logger.info("hf upload repo=%s rev=%s files=%d bytes=%d", repo, revision, len(names), total_bytes)
        return StoreRef(kind=HF_KIND, repo=repo, revision=revision)

    # -- download ------------------------------------------------------------------------------
    def download(
        self,
        ref: StoreRef,
        dest: Path,
        *,
        max_bytes: int,
        files: tuple[str, ...] = CHECKPOINT_FILES,
    ) -> Path:
        """Fetch ``files`` of ``ref`` into ``dest`` after checking their sizes; returns ``dest``.

        Sizes come from the Hub's paths-info at the pinned commit; a missing file or a total
        over ``max_bytes`` refuses the download before any file content is requested. Files
        land in a staging folder first, so ``dest`` never holds a partial download.

        Raises:
            StoreError: ``refused`` (not a commit sha, bad name, gated), ``missing`` (repo,
                revision or file), ``too_large``, ``unreachable``, ``error``.
        """
        _check_ref(ref)
        names = validate_file_names(files, repo=ref.repo)
        sizes = self._sizes(ref, names)
        where = f"hf download repo={ref.repo} rev={ref.revision}"
        missing = [name for name in names if name not in sizes]
        if missing:
            raise StoreError(
                f"{where}: file(s) {', '.join(missing)} not in revision",
                reason="missing",
                repo=ref.repo,
                revision=ref.revision,
            )
        total_bytes = sum(sizes[name] for name in names)
        if total_bytes > max_bytes:
            raise StoreError(
                f"{where}: {total_bytes} bytes exceeds max_bytes={max_bytes}",
                reason="too_large",
                repo=ref.repo,
                revision=ref.revision,
            )
        self._fetch(ref, names, {name: sizes[name] for name in names}, Path(dest))
        logger.info(
            "hf download repo=%s rev=%s files=%d bytes=%d", ref.repo, ref.revision, len(names), total_bytes
        )
        return Path(dest)

    def list_files(self, ref: StoreRef) -> dict[str, int]:
        """All files of the pinned revision with their sizes in bytes (metadata only).

        Raises:
            StoreError: as ``download``, less ``too_large``.
        """
        _check_ref(ref)

        def tree() -> dict[str, int]:
            entries = self._api.list_repo_tree(
                ref.repo, revision=ref.revision, recursive=True, repo_type="model"
            )
            return {entry.path: entry.size for entry in entries if isinstance(entry, RepoFile)}

        return dict(sorted(self._call("list_files", ref.repo, ref.revision, tree).items()))

    # -- helpers -------------------------------------------------------------------------------
    def _sizes(self, ref: StoreRef, names: tuple[str, ...]) -> dict[str, int]:
        """Sizes of those of ``names`` that exist at the revision (folders do not count)."""

        def paths_info() -> dict[str, int]:
            entries = self._api.get_paths_info(
                ref.repo, list(names), revision=ref.revision, repo_type="model"
            )
            return {entry.path: entry.size for entry in entries if isinstance(entry, RepoFile)}

        return self._call("paths_info", ref.repo, ref.revision, paths_info)

    def _fetch(self, ref: StoreRef, names: tuple[str, ...], sizes: dict[str, int], dest: Path) -> None:
        """Download each file into a staging folder inside ``dest``, check sizes, then move them in."""
        try:
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".hf-download-", dir=dest))
        except OSError as e:
            raise StoreError(
                f"hf download repo={ref.repo} rev={ref.revision} dest={dest}: {e}",
                repo=ref.repo,
                revision=ref.revision,
            ) from e
        try:
            for name in names:
                path = self._call(
                    "download",
                    ref.repo,
                    ref.revision,
                    functools.partial(
                        self._api.hf_hub_download,
                        ref.repo,
                        name,
                        revision=ref.revision,
                        repo_type="model",
                        local_dir=staging,
                    ),
                )
                _check_size(ref, name, Path(path), sizes[name])
            for name in names:
                os.replace(staging / name, dest / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _call(self, what: str, repo: str, revision: str | None, fn: Callable[[], T]) -> T:
        """Run one Hub call with bounded retries on transient errors; map failures to StoreError."""
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except _MAPPED_ERRORS as e:
                if isinstance(e, StoreError):
                    raise
                error = _to_store_error(e, what=what, repo=repo, revision=revision)
                if not _is_transient(e) or _retried_by_hub(what, e) or attempt == attempts:
                    raise error from e
                delay_s = _retry_delay_s(
                    e, fallback_s=min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                )
                logger.warning(
                    "hf %s failed repo=%s rev=%s attempt=%d/%d retry_in_s=%.1f error=%s",
                    what,
                    repo,
                    revision,
                    attempt,
                    attempts,
                    delay_s,
                    type(e).__name__,
                )
                if delay_s > 0:
                    self._sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")


def _check_ref(ref: StoreRef) -> None:
    check_ref(
        ref,
        kind=HF_KIND,
        revision=COMMIT_SHA,
        rule="a 40-hex lowercase commit sha (a branch or tag can move after the commit deadline)",
    )


def _check_size(ref: StoreRef, name: str, path: Path, expected_bytes: int) -> None:
    actual_bytes = path.stat().st_size
    if actual_bytes != expected_bytes:
        raise StoreError(
            f"hf download repo={ref.repo} rev={ref.revision}: file {name} is {actual_bytes} bytes, "
            f"metadata said {expected_bytes}",
            repo=ref.repo,
            revision=ref.revision,
        )


def _retry_delay_s(error: BaseException, *, fallback_s: float) -> float:
    """How long to wait before retrying: what the Hub asked for, else ``fallback_s``.

    A 429 or 503 carries the Hub's own answer (``RateLimit`` headers or ``Retry-After``);
    retrying sooner only spends the rate-limit budget again. ``RateLimit`` is read with
    huggingface_hub's parser, the one its own ``http_backoff`` uses; both are capped at
    ``MAX_RETRY_AFTER_S`` so a hostile endpoint cannot park a node for hours.
    """
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return fallback_s
    ratelimit = parse_ratelimit_headers(headers)
    if ratelimit is not None and ratelimit.remaining == 0:
        return float(min(ratelimit.reset_in_seconds, MAX_RETRY_AFTER_S))
    retry_after = str(headers.get("Retry-After", "")).strip()
    if retry_after.isdigit():  # delay-seconds; an HTTP-date is not honoured (as in huggingface_hub)
        return float(min(int(retry_after), MAX_RETRY_AFTER_S))
    return fallback_s


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


# What huggingface_hub (2.x) already retried inside each call before the error reached us.
_HUB_RETRIED_TRANSPORT = (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError)
_HUB_RETRIES_EVERYTHING = frozenset({"preupload", "list_files"})  # http_backoff on every request
_HUB_RETRIES_DOWNLOAD_GET = frozenset({408, 429})  # http_get: these and connection drops (HEAD: all)


def _retried_by_hub(what: str, error: BaseException) -> bool:
    """True when huggingface_hub has already spent its own retries on this failure.

    Wrapping those calls again would multiply the attempts (5 x 4) and the waits; what the Hub
    library sends only once (``create_repo``, ``paths-info``, the commit request) is ours to retry.
    """
    if what in _HUB_RETRIES_EVERYTHING:
        return True
    if what != "download":
        return False
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) else error
    if isinstance(cause, _HUB_RETRIED_TRANSPORT):
        return True
    if not isinstance(cause, HfHubHTTPError):
        return False
    # hf_hub_download retries its metadata HEAD on every transient status, the GET only on these.
    request = getattr(cause.response, "request", None)
    return getattr(request, "method", "GET") == "HEAD" or _status(cause) in _HUB_RETRIES_DOWNLOAD_GET


def _is_transient(error: BaseException) -> bool:
    """Worth retrying: a transport failure, a Hub busy status, or a download cut off mid-way."""
    if isinstance(error, OfflineModeIsEnabled):
        return False  # HF_HUB_OFFLINE is a setting, not a hiccup
    if isinstance(error, httpx2.TransportError):
        return True
    if isinstance(error, LocalEntryNotFoundError):
        return error.__cause__ is not None and _is_transient(error.__cause__)
    return isinstance(error, HfHubHTTPError) and _status(error) in _TRANSIENT_STATUS


def _classify(error: BaseException) -> tuple[str, str]:
    """(reason, short description) of a huggingface_hub or transport exception."""
    status = _status(error)
    checks: list[tuple[type[BaseException], str, str]] = [
        (GatedRepoError, "refused", "gated repository, no access"),
        (RepositoryNotFoundError, "missing", "repository not found"),
        (RevisionNotFoundError, "missing", "revision not found"),
        (DisabledRepoError, "refused", "repository disabled"),
        (LocalEntryNotFoundError, "unreachable", "Hub unreachable while fetching the file"),
        (EntryNotFoundError, "missing", "file not found"),
        (OfflineModeIsEnabled, "unreachable", "HF_HUB_OFFLINE is set"),
        (httpx2.TimeoutException, "unreachable", "timed out"),
        (httpx2.TransportError, "unreachable", "connection failed"),
        (HFValidationError, "refused", "invalid repo id or revision"),
    ]
    for error_type, reason, description in checks:
        if isinstance(error, error_type):
            return reason, description
    if isinstance(error, HfHubHTTPError) and status is not None:
        if status in (401, 403):
            return "refused", f"HTTP {status}, access denied"
        if status == 404:
            return "missing", "HTTP 404"
        if status == 413:
            return "too_large", "HTTP 413"
        if status in _TRANSIENT_STATUS:
            return "unreachable", f"HTTP {status}"
        return "error", f"HTTP {status}"
    first_line = (str(error).strip().splitlines() or ["no detail"])[0]
    return "error", first_line[:200]


def _to_store_error(error: BaseException, *, what: str, repo: str, revision: str | None) -> StoreError:
    reason, description = _classify(error)
    where = f"hf {what} repo={repo}" + (f" rev={revision}" if revision else "")
    return StoreError(
        f"{where}: {description} ({type(error).__name__})", reason=reason, repo=repo, revision=revision
    )
