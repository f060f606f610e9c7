"""HfHubStore through the real huggingface_hub code paths against a loopback Hub server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer, configure_hf_env, running_hub

from connito.errors import StoreError
from connito.hub import CHECKPOINT_FILES, CheckpointStore, StoreRef
from connito.hub.hf import HfHubStore

REPO = "miner-1/experts"
MISSING_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with running_hub(monkeypatch, tmp_path / "hf_home") as server:
        yield server


def _write_checkpoint(folder: Path, *, payload: bytes = b"\x00\x01tensor-bytes" * 200) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"experts.safetensors": payload, "manifest.json": b'{"schema_version": 1}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _store(server: HubServer, **kwargs: object) -> HfHubStore:
    options: dict[str, object] = {"token": None, "endpoint": server.url, "max_retries": 0, "backoff_s": 0.0}
    options.update(kwargs)
    return HfHubStore(**options)  # type: ignore[arg-type]


def _single_line(error: StoreError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_hf_store_satisfies_checkpoint_store_protocol() -> None:
    """HfHubStore is a CheckpointStore of kind "hf"."""
    store = HfHubStore(token=None, endpoint="http://127.0.0.1:9")
    assert isinstance(store, CheckpointStore)
    assert store.kind == "hf"


def test_round_trip_bytes_equal(hub: HubServer, tmp_path: Path) -> None:
    """Upload returns the new commit sha; downloading it gives the same bytes and nothing else."""
    store = _store(hub)
    files = _write_checkpoint(tmp_path / "ckpt")

    ref = store.upload(tmp_path / "ckpt", repo=REPO, message="cycle 3")
    dest = store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert ref == StoreRef(kind="hf", repo=REPO, revision=hub.repos[REPO].branches["main"])
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)  # no .cache or staging left
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert hub.unknown_requests == []


def test_upload_commits_exactly_the_named_files(hub: HubServer, tmp_path: Path) -> None:
    """Other files in the folder never reach the Hub."""
    store = _store(hub)
    files = _write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"private state")

    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    assert hub.files_at(REPO, ref.revision) == files
    assert store.list_files(ref) == {name: len(data) for name, data in files.items()}


def test_old_revision_stays_downloadable_after_new_upload(hub: HubServer, tmp_path: Path) -> None:
    """A ref pins its commit: a later upload to the same repo does not change what it serves."""
    store = _store(hub)
    old_files = _write_checkpoint(tmp_path / "v1", payload=b"weights-v1")
    _write_checkpoint(tmp_path / "v2", payload=b"weights-v2")
    old = store.upload(tmp_path / "v1", repo=REPO)
    new = store.upload(tmp_path / "v2", repo=REPO)

    store.download(old, tmp_path / "dest", max_bytes=1 << 20)

    assert old.revision != new.revision
    assert (tmp_path / "dest" / "experts.safetensors").read_bytes() == old_files["experts.safetensors"]


def test_download_fetches_only_requested_files(hub: HubServer, tmp_path: Path) -> None:
    """A repo's other files (here a large one) are never requested."""
    store = _store(hub)
    _write_checkpoint(tmp_path / "ckpt")
    store.upload(tmp_path / "ckpt", repo=REPO)
    revision = hub.add_commit(REPO, {"huge.bin": b"\x00" * 100_000})

    store.download(StoreRef(kind="hf", repo=REPO, revision=revision), tmp_path / "dest", max_bytes=1 << 20)

    assert hub.resolve_paths()
    assert all(path.rsplit("/", 1)[-1] in CHECKPOINT_FILES for path in hub.resolve_paths())
    assert not (tmp_path / "dest" / "huge.bin").exists()


def test_wrong_revision_is_missing(hub: HubServer, tmp_path: Path) -> None:
    """A 40-hex sha the repo does not have is missing; the message names repo and revision."""
    store = _store(hub)
    _write_checkpoint(tmp_path / "ckpt")
    store.upload(tmp_path / "ckpt", repo=REPO)

    with pytest.raises(StoreError) as info:
        store.download(
            StoreRef(kind="hf", repo=REPO, revision=MISSING_SHA), tmp_path / "dest", max_bytes=1 << 20
        )

    assert info.value.reason == "missing"
    assert f"repo={REPO} rev={MISSING_SHA}: revision not found" in _single_line(info.value)
    assert hub.resolve_paths() == []


@pytest.mark.parametrize("revision", ["main", "v1.0", "ABCDEF0123456789ABCDEF0123456789ABCDEF01", "abc123"])
def test_non_sha_revision_refused_without_contacting_hub(
    hub: HubServer, tmp_path: Path, revision: str
) -> None:
    """Branch names, tags, short or uppercase shas can move or be ambiguous: refused up front."""
    store = _store(hub)

    with pytest.raises(StoreError) as info:
        store.download(
            StoreRef(kind="hf", repo=REPO, revision=revision), tmp_path / "dest", max_bytes=1 << 20
        )

    assert info.value.reason == "refused"
    assert "40-hex" in _single_line(info.value)
    assert hub.requests == []


def test_oversize_refused_with_nothing_downloaded(hub: HubServer, tmp_path: Path) -> None:
    """Total size over max_bytes is refused from metadata alone: no file content is requested."""
    store = _store(hub)
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    total_bytes = sum(len(data) for data in files.values())

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=total_bytes - 1)

    assert info.value.reason == "too_large"
    assert f"{total_bytes} bytes exceeds max_bytes={total_bytes - 1}" in _single_line(info.value)
    assert hub.resolve_paths() == []
    assert not (tmp_path / "dest").exists()


def test_missing_file_refused_with_nothing_downloaded(hub: HubServer, tmp_path: Path) -> None:
    """A requested file the revision lacks fails before any file is fetched."""
    store = _store(hub)
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20, files=("manifest.json", "extra.bin"))

    assert info.value.reason == "missing"
    assert "extra.bin not in revision" in _single_line(info.value)
    assert hub.resolve_paths() == []


def test_missing_repo_is_missing(hub: HubServer, tmp_path: Path) -> None:
    """A repo that does not exist is missing."""
    store = _store(hub)
    ref = StoreRef(kind="hf", repo="nobody/nothing", revision=MISSING_SHA)

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert info.value.reason == "missing"
    assert "repo=nobody/nothing" in _single_line(info.value)
    assert "repository not found" in str(info.value)


def test_server_down_is_unreachable_after_bounded_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the Hub down, each failed attempt logs one WARNING, then unreachable is raised."""
    with HubServer() as server:
        url = server.url
    configure_hf_env(monkeypatch, url, tmp_path / "hf_home")
    store = HfHubStore(token=None, endpoint=url, max_retries=2, backoff_s=0.0)
    ref = StoreRef(kind="hf", repo=REPO, revision=MISSING_SHA)

    with caplog.at_level(logging.WARNING, logger="connito.hub.hf"), pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert info.value.reason == "unreachable"
    assert f"repo={REPO} rev={MISSING_SHA}: connection failed" in _single_line(info.value)
    warnings = [r for r in caplog.records if r.name == "connito.hub.hf" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert not (tmp_path / "dest").exists()


def test_upload_with_server_down_is_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An upload to a dead endpoint fails as unreachable, naming the repo."""
    with HubServer() as server:
        url = server.url
    configure_hf_env(monkeypatch, url, tmp_path / "hf_home")
    _write_checkpoint(tmp_path / "ckpt")

    with pytest.raises(StoreError) as info:
        HfHubStore(token=None, endpoint=url, max_retries=0).upload(tmp_path / "ckpt", repo=REPO)

    assert info.value.reason == "unreachable"
    assert f"repo={REPO}" in _single_line(info.value)


def test_transient_server_error_is_retried(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One 503 on the metadata call costs one WARNING and a retry, not the download."""
    store = _store(hub, max_retries=2)
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    hub.fail_next("/paths-info/", 503)

    with caplog.at_level(logging.WARNING, logger="connito.hub.hf"):
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert (tmp_path / "dest" / "manifest.json").read_bytes() == files["manifest.json"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "connito.hub.hf"]
    assert len(warnings) == 1 and "paths_info failed" in warnings[0] and "attempt=1/3" in warnings[0]


def test_token_comes_from_constructor_not_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HF_TOKEN in the environment is ignored; only the constructor's token authenticates."""
    _write_checkpoint(tmp_path / "ckpt")
    with running_hub(monkeypatch, tmp_path / "hf_home", token="secret-token") as server:
        monkeypatch.setenv("HF_TOKEN", "secret-token")

        with pytest.raises(StoreError) as info:
            _store(server).upload(tmp_path / "ckpt", repo=REPO)
        ref = _store(server, token="secret-token").upload(tmp_path / "ckpt", repo=REPO)

    assert info.value.reason == "refused"
    assert "access denied" in _single_line(info.value)
    assert ref.revision == server.repos[REPO].branches["main"]


def test_private_repo_hidden_from_anonymous_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """private=True creates a private repo; an anonymous reader sees it as missing."""
    _write_checkpoint(tmp_path / "ckpt")
    with running_hub(monkeypatch, tmp_path / "hf_home", token="secret-token") as server:
        ref = _store(server, token="secret-token", private=True).upload(tmp_path / "ckpt", repo=REPO)
        with pytest.raises(StoreError) as info:
            _store(server).download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert server.repos[REPO].private
    assert info.value.reason == "missing"


def test_from_env_reads_token_and_endpoint(hub: HubServer, tmp_path: Path) -> None:
    """from_env takes HF_TOKEN and HF_ENDPOINT; repr never shows the token."""
    store = HfHubStore.from_env(environ={"HF_TOKEN": "tok-123", "HF_ENDPOINT": hub.url})
    _write_checkpoint(tmp_path / "ckpt")

    store.upload(tmp_path / "ckpt", repo=REPO)

    assert store.endpoint == hub.url
    assert "Bearer tok-123" in hub.auth_headers
    assert "tok-123" not in repr(store)


def test_bad_repo_id_refused_without_contacting_hub(hub: HubServer, tmp_path: Path) -> None:
    """Path-like repo ids are refused before any request."""
    _write_checkpoint(tmp_path / "ckpt")

    with pytest.raises(StoreError) as info:
        _store(hub).upload(tmp_path / "ckpt", repo="../etc")

    assert info.value.reason == "refused"
    assert "'../etc'" in _single_line(info.value)
    assert hub.requests == []


def test_retry_waits_as_long_as_the_hubs_retry_after(hub: HubServer, tmp_path: Path) -> None:
    """A 429 with ``Retry-After: 7`` waits 7 s (not the 0 s backoff) before the one retry."""
    sleeps: list[float] = []
    store = HfHubStore(token=None, endpoint=hub.url, max_retries=2, backoff_s=0.0, sleep=sleeps.append)
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    hub.fail_next("/paths-info/", 429, retry_after_s=7)

    store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert sleeps == [7.0]


def test_retry_after_is_capped(hub: HubServer, tmp_path: Path) -> None:
    """A hostile ``Retry-After`` cannot park the node for longer than MAX_RETRY_AFTER_S."""
    from connito.hub.hf import MAX_RETRY_AFTER_S

    sleeps: list[float] = []
    store = HfHubStore(token=None, endpoint=hub.url, max_retries=1, backoff_s=0.0, sleep=sleeps.append)
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    hub.fail_next("/paths-info/", 503, retry_after_s=86_400)

    store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert sleeps == [float(MAX_RETRY_AFTER_S)]


def _connito_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "connito.hub.hf" and r.levelno >= logging.WARNING
    ]


def test_preupload_is_retried_by_huggingface_hub_alone(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 on preupload is retried inside huggingface_hub's backoff; connito adds no attempt."""
    sleeps: list[float] = []
    store = _store(hub, max_retries=3, sleep=sleeps.append)
    files = _write_checkpoint(tmp_path / "ckpt")
    hub.fail_next("/preupload/", 503)

    with caplog.at_level(logging.WARNING, logger="connito.hub.hf"):
        ref = store.upload(tmp_path / "ckpt", repo=REPO)

    assert hub.files_at(REPO, ref.revision) == files
    assert [path for method, path in hub.requests if "/preupload/" in path] == [
        f"/api/models/{REPO}/preupload/main"
    ] * 2
    assert _connito_warnings(caplog) == [] and sleeps == []


def test_exhausted_hub_backoff_is_not_wrapped_again(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When huggingface_hub has spent its retries, connito raises at once (no 6 x 4 attempts)."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda _s: None)
    store = _store(hub, max_retries=3, sleep=lambda _s: None)
    _write_checkpoint(tmp_path / "ckpt")
    for _ in range(20):
        hub.fail_next("/preupload/", 503)

    with pytest.raises(StoreError) as info:
        store.upload(tmp_path / "ckpt", repo=REPO)

    assert info.value.reason == "unreachable" and "hf preupload repo=" in _single_line(info.value)
    preuploads = [path for _, path in hub.requests if "/preupload/" in path]
    assert len(preuploads) == 6  # huggingface_hub's own: 1 + 5 retries, and nothing on top


def test_failed_commit_is_retried_without_uploading_again(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """huggingface_hub sends the commit request once; connito retries that request alone."""
    store = _store(hub, max_retries=2)
    files = _write_checkpoint(tmp_path / "ckpt")
    hub.fail_next("/commit/", 503)

    with caplog.at_level(logging.WARNING, logger="connito.hub.hf"):
        ref = store.upload(tmp_path / "ckpt", repo=REPO)

    assert hub.files_at(REPO, ref.revision) == files
    assert sum("/preupload/" in path for _, path in hub.requests) == 1
    assert sum("/commit/" in path for _, path in hub.requests) == 2
    warnings = _connito_warnings(caplog)
    assert len(warnings) == 1 and "commit failed" in warnings[0] and "attempt=1/3" in warnings[0]


def test_file_get_rate_limit_is_left_to_huggingface_hub(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 on a file download is huggingface_hub's to retry (it reads Retry-After); connito stays out."""
    sleeps: list[float] = []
    store = _store(hub, max_retries=3, sleep=sleeps.append)
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    hub.fail_next("/resolve/", 429, retry_after_s=0)

    with caplog.at_level(logging.WARNING, logger="connito.hub.hf"):
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert (tmp_path / "dest" / "experts.safetensors").read_bytes() == files["experts.safetensors"]
    assert _connito_warnings(caplog) == [] and sleeps == []


def test_downloads_leave_nothing_in_the_operators_hf_cache(hub: HubServer, tmp_path: Path) -> None:
    """A validator downloads every submission every cycle: none of it may pile up in HF_HUB_CACHE."""
    store = _store(hub)
    refs = []
    for i in range(3):
        _write_checkpoint(tmp_path / f"ckpt-{i}", payload=bytes([i]) * 4096)
        refs.append(store.upload(tmp_path / f"ckpt-{i}", repo=REPO))
    for i, ref in enumerate(refs):
        store.download(ref, tmp_path / f"dest-{i}", max_bytes=1 << 20)
        assert (tmp_path / f"dest-{i}" / "experts.safetensors").read_bytes() == bytes([i]) * 4096
        assert sorted(p.name for p in (tmp_path / f"dest-{i}").iterdir()) == sorted(CHECKPOINT_FILES)

    cached = [p for p in (tmp_path / "hf_home" / "hub").rglob("*") if p.is_file()]
    assert cached == []
