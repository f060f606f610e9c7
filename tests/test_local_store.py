"""LocalStore: content-addressed revisions, size caps before copying, traversal refused, tamper detection."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connito.errors import StoreError
from connito.hub import CHECKPOINT_FILES, CheckpointStore, LocalStore, StoreRef
from connito.hub import local as local_module
from connito.hub.local import INDEX_NAME, compute_revision

REPO = "miner-1/experts"


def _write_checkpoint(folder: Path, *, payload: bytes = b"\x00\x01tensor-bytes" * 100) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"experts.safetensors": payload, "manifest.json": b'{"schema_version": 1}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _single_line(error: StoreError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_local_store_satisfies_checkpoint_store_protocol(tmp_path: Path) -> None:
    """LocalStore is a CheckpointStore of kind "local"."""
    store = LocalStore(tmp_path / "store")
    assert isinstance(store, CheckpointStore)
    assert store.kind == "local"


def test_round_trip_bytes_equal(tmp_path: Path) -> None:
    """Upload then download returns the same bytes, and only the checkpoint files."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    dest = store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert ref.kind == "local" and ref.repo == REPO
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data


def test_upload_stores_exactly_the_named_files(tmp_path: Path) -> None:
    """Files in the folder that were not named are not part of the revision."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"not for upload")

    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    assert sorted(store.list_files(ref)) == sorted(CHECKPOINT_FILES)


def test_identical_uploads_share_a_revision(tmp_path: Path) -> None:
    """The revision depends on file names and content only, not on folder or time."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "a")
    _write_checkpoint(tmp_path / "b")

    first = store.upload(tmp_path / "a", repo=REPO)
    second = store.upload(tmp_path / "b", repo=REPO)

    assert first == second
    assert len([p for p in (tmp_path / "store" / REPO).iterdir()]) == 1  # no stray staging dirs


def test_changed_content_gives_a_new_revision(tmp_path: Path) -> None:
    """One changed byte changes the revision."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "a", payload=b"weights-v1")
    _write_checkpoint(tmp_path / "b", payload=b"weights-v2")

    assert store.upload(tmp_path / "a", repo=REPO) != store.upload(tmp_path / "b", repo=REPO)


def test_revision_is_sha256_over_names_and_content_hashes(tmp_path: Path) -> None:
    """The revision is recomputable from the files alone (what a verifier does)."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")

    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert ref.revision == compute_revision(digests)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,10}", fullmatch=True), st.binary(max_size=32), min_size=1
    )
)
def test_compute_revision_ignores_order_and_binds_content(files: dict[str, bytes]) -> None:
    """Permuting files keeps the revision; changing any file's content changes it."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    reversed_digests = dict(reversed(list(digests.items())))
    assert compute_revision(digests) == compute_revision(reversed_digests)
    name = next(iter(files))
    altered = {**digests, name: hashlib.sha256(files[name] + b"x").hexdigest()}
    assert compute_revision(altered) != compute_revision(digests)


def test_oversize_refused_before_copying(tmp_path: Path) -> None:
    """A revision over max_bytes is refused as too_large and nothing is copied."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    total_bytes = sum(len(data) for data in files.values())

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=total_bytes - 1)

    assert info.value.reason == "too_large"
    assert f"max_bytes={total_bytes - 1}" in _single_line(info.value)
    assert not (tmp_path / "dest").exists()


def test_download_at_exact_cap_succeeds(tmp_path: Path) -> None:
    """max_bytes is inclusive: a revision of exactly max_bytes downloads."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    store.download(ref, tmp_path / "dest", max_bytes=sum(len(data) for data in files.values()))

    assert (tmp_path / "dest" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "repo",
    [
        "../escape",
        "/abs/path",
        "a/../b",
        "ns/..",
        "ns/name/extra",
        "noslash",
        "ns/.hidden",
        "ns/na me",
        "ns\\x/y",
        "",
    ],
)
def test_bad_repo_id_refused(tmp_path: Path, repo: str) -> None:
    """Repo ids that could leave the store root (or are not namespace/name) are refused."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")

    with pytest.raises(StoreError) as info:
        store.upload(tmp_path / "ckpt", repo=repo)

    assert info.value.reason == "refused"
    assert repr(repo) in _single_line(info.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".revision.json", "", "a\\b", "x..y"])
def test_path_traversal_in_file_name_refused_on_upload(tmp_path: Path, name: str) -> None:
    """File names with separators, '..' or a leading dot are refused on upload."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")

    with pytest.raises(StoreError) as info:
        store.upload(tmp_path / "ckpt", repo=REPO, files=("manifest.json", name))

    assert info.value.reason == "refused"
    assert repr(name) in _single_line(info.value)


@pytest.mark.parametrize("name", ["../outside.txt", "sub/../../outside.txt", ".revision.json"])
def test_path_traversal_in_file_name_refused_on_download(tmp_path: Path, name: str) -> None:
    """A download cannot read outside the revision or fetch the index."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    (tmp_path / "store" / REPO / "outside.txt").write_bytes(b"secret")

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20, files=(name,))

    assert info.value.reason == "refused"
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("revision", ["main", "A" * 64, "0" * 40, "../" + "0" * 61])
def test_malformed_revision_refused(tmp_path: Path, revision: str) -> None:
    """Only 64-hex lowercase revisions are accepted."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    store.upload(tmp_path / "ckpt", repo=REPO)

    with pytest.raises(StoreError) as info:
        store.download(
            StoreRef(kind="local", repo=REPO, revision=revision), tmp_path / "dest", max_bytes=1 << 20
        )

    assert info.value.reason == "refused"
    assert "revision must be 64" in _single_line(info.value)


def test_missing_revision_reported_as_missing(tmp_path: Path) -> None:
    """A well-formed revision that was never uploaded is missing, named in the message."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    store.upload(tmp_path / "ckpt", repo=REPO)
    ref = StoreRef(kind="local", repo=REPO, revision="ab" * 32)

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert info.value.reason == "missing"
    assert f"repo={REPO} rev={'ab' * 32}: revision not found" in _single_line(info.value)


def test_missing_repo_reported_as_missing(tmp_path: Path) -> None:
    """A repo that does not exist is missing."""
    store = LocalStore(tmp_path / "store")

    with pytest.raises(StoreError) as info:
        store.download(
            StoreRef(kind="local", repo="nobody/none", revision="cd" * 32), tmp_path / "d", max_bytes=1
        )

    assert info.value.reason == "missing"
    assert "repo=nobody/none" in _single_line(info.value)


def test_missing_file_refused_before_copying(tmp_path: Path) -> None:
    """Asking for a file the revision lacks copies nothing, not even the files that exist."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20, files=("manifest.json", "extra.bin"))

    assert info.value.reason == "missing"
    assert "file extra.bin not in revision" in _single_line(info.value)
    assert not (tmp_path / "dest").exists()


def test_upload_of_missing_source_file_refused(tmp_path: Path) -> None:
    """Uploading a file the folder lacks fails with missing and stores nothing."""
    store = LocalStore(tmp_path / "store")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_bytes(b"{}")

    with pytest.raises(StoreError) as info:
        store.upload(tmp_path / "ckpt", repo=REPO)

    assert info.value.reason == "missing"
    assert "experts.safetensors" in _single_line(info.value)


def test_tampered_file_detected_and_not_delivered(tmp_path: Path) -> None:
    """Editing a stored file after upload (same size) is refused; dest gets no file."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    stored = tmp_path / "store" / REPO / ref.revision / "experts.safetensors"
    stored.write_bytes(b"\xff" + files["experts.safetensors"][1:])

    with pytest.raises(StoreError) as info:
        store.download(ref, tmp_path / "dest", max_bytes=1 << 20)

    assert info.value.reason == "refused"
    assert "experts.safetensors does not match the revision" in _single_line(info.value)
    assert list((tmp_path / "dest").iterdir()) == []


def test_tampered_index_detected(tmp_path: Path) -> None:
    """An index rewritten to match edited files no longer hashes to the revision."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)
    _write_checkpoint(tmp_path / "other", payload=b"forged")
    forged = store.upload(tmp_path / "other", repo=REPO)
    index_path = tmp_path / "store" / REPO / ref.revision / INDEX_NAME
    index_path.write_bytes((tmp_path / "store" / REPO / forged.revision / INDEX_NAME).read_bytes())

    with pytest.raises(StoreError) as info:
        store.list_files(ref)

    assert info.value.reason == "refused"
    assert "does not hash to the revision" in _single_line(info.value)


def test_list_files_reports_sizes(tmp_path: Path) -> None:
    """list_files gives each file's size in bytes."""
    store = LocalStore(tmp_path / "store")
    files = _write_checkpoint(tmp_path / "ckpt")
    ref = store.upload(tmp_path / "ckpt", repo=REPO)

    assert store.list_files(ref) == {name: len(data) for name, data in files.items()}


def test_wrong_kind_refused(tmp_path: Path) -> None:
    """A ref for another store kind is refused."""
    store = LocalStore(tmp_path / "store")

    with pytest.raises(StoreError) as info:
        store.download(StoreRef(kind="hf", repo=REPO, revision="ab" * 32), tmp_path / "d", max_bytes=1)

    assert info.value.reason == "refused"
    assert "kind 'hf'" in _single_line(info.value)


def test_crash_mid_upload_leaves_no_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while copying leaves neither a revision nor a staging directory."""
    store = LocalStore(tmp_path / "store")
    _write_checkpoint(tmp_path / "ckpt")
    real_copy = local_module._copy_hashed
    calls = []

    def failing_copy(source: Path, target: Path, **kwargs: object) -> object:
        calls.append(source.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(source, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local_module, "_copy_hashed", failing_copy)

    with pytest.raises(StoreError) as info:
        store.upload(tmp_path / "ckpt", repo=REPO)

    assert info.value.reason == "error"
    assert "No space left" in _single_line(info.value)
    assert list((tmp_path / "store" / REPO).iterdir()) == []
