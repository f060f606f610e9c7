"""The library index: round trip, naming, idempotent and concurrent recording, atomicity, removals."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch

from connito.errors import LibraryError
from connito.library import Contributor, Library, StoreLocation, VersionDraft, parse_version
from connito.library.index import INDEX_FILE
from connito.ml.moe import expert_key
from connito.protocol.checkpoint import tensors_digest

GENESIS = "0" * 64


def experts(seed: int, items=((0, 1), (1, 2))) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer, expert in items:
        for projection in ("gate_proj", "up_proj", "down_proj"):
            state[expert_key(layer, expert, projection)] = torch.randn(4, 3, generator=generator)
    return state


def draft(
    state: dict[str, torch.Tensor], *, domain: str = "math", cycle: int = 0, parent: str = GENESIS, **changes
) -> VersionDraft:
    values = dict(
        domain=domain,
        model_id="inline:qwen3_moe",
        model_revision="r" * 8,
        selection_digest="a" * 64,
        config_digest="b" * 64,
        cycle=cycle,
        tensors_sha256=tensors_digest(state),
        store=StoreLocation(kind="local", repo="validators/v0", revision="c" * 64),
        domain_loss=2.5,
        general_loss=4.0,
        eval_seed=0,
        parent_revision=parent,
        decision="merged",
        contributors=(Contributor(hotkey="5Fmin", uid=3, weight=0.5, tensors_sha256="d" * 64),),
        merge_record_sha256="e" * 64,
        lead_hotkey="5Flead",
        block=120 + cycle,
    )
    values.update(changes)
    return VersionDraft(**values)


def test_record_round_trips_through_a_fresh_open(tmp_path):
    """Every field recorded comes back from a new Library on the same folder, tensors bit-exact."""
    state = experts(1)
    record, is_new = Library(tmp_path).record(draft(state), state)
    again = Library(tmp_path).get("math@v1")
    assert is_new and again == record
    assert again.name == "math@v1" and again.experts == ("0.1", "1.2") and again.parent is None
    assert again.store == StoreLocation(kind="local", repo="validators/v0", revision="c" * 64)
    assert again.contributors[0].weight == 0.5 and again.block == 120 and again.domain_loss == 2.5
    loaded = Library(tmp_path).load_experts(again)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_numbering_latest_and_lineage(tmp_path):
    """v1, v2 per domain in record order; latest is the newest; parent found by tensors digest."""
    library = Library(tmp_path)
    first, second, other = experts(1), experts(2), experts(3)
    v1, _ = library.record(draft(first, cycle=0), first)
    v2, _ = library.record(draft(second, cycle=1, parent=v1.tensors_sha256), second)
    c1, _ = library.record(draft(other, domain="code", cycle=0), other)
    assert (v1.name, v2.name, c1.name) == ("math@v1", "math@v2", "code@v1")
    assert v2.parent == "math@v1" and c1.parent is None
    assert library.get("math@latest") == v2 and library.get("math") == v2
    assert [r.name for r in library.versions()] == ["code@v1", "math@v1", "math@v2"]
    assert [r.name for r in library.versions("math")] == ["math@v1", "math@v2"]


@pytest.mark.parametrize("text", ["math@v0", "math@3", "Math@v1", "math@v1x", "@v1", "math@", ""])
def test_bad_version_names_are_refused_with_the_text(text):
    with pytest.raises(LibraryError, match="must be DOMAIN@vN"):
        parse_version(text)


def test_unknown_version_names_the_known_domains(tmp_path):
    library = Library(tmp_path)
    state = experts(1)
    library.record(draft(state), state)
    with pytest.raises(LibraryError, match=r"'math@v7'.*domains: math"):
        library.get("math@v7")


def test_recording_twice_is_idempotent_and_fills_missing_fields(tmp_path):
    """A second writer of the same (domain, cycle, tensors) adds no version, only what was unknown."""
    library = Library(tmp_path)
    state = experts(1)
    first, new = library.record(
        draft(state, domain_loss=None, general_loss=None, store=None, block=None), state
    )
    assert new and first.domain_loss is None and first.store is None
    second, new = library.record(draft(state), state)
    assert not new and second.name == "math@v1"
    assert second.domain_loss == 2.5 and second.store is not None and second.block == 120
    third, _ = library.record(draft(state, domain_loss=9.9), state)
    assert third.domain_loss == 2.5  # the first known value stays
    assert [e.kind for e in library.events("math@v1")] == ["record", "update"]
    assert len(library.versions()) == 1


def test_concurrent_writers_get_distinct_numbers_and_no_duplicates(tmp_path):
    """Eight threads (own connections) record four versions twice each: exactly v1..v4, each once."""
    states = [experts(i) for i in range(4)]
    errors = []

    def writer(index: int) -> None:
        try:
            library = Library(tmp_path)
            state = states[index % 4]
            library.record(draft(state, cycle=index % 4), state)
        except Exception as exc:  # surfaced below: a thread cannot raise into the test
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    records = Library(tmp_path).versions("math")
    assert sorted(r.number for r in records) == [1, 2, 3, 4]
    assert sorted(r.cycle for r in records) == [0, 1, 2, 3]


def test_a_failure_inside_the_transaction_leaves_no_version(tmp_path, monkeypatch):
    """Atomicity: if the history event cannot be written, the version row is rolled back too."""
    library = Library(tmp_path)
    state = experts(1)
    import connito.library.index as index_module

    def broken_event(*_args, **_kwargs):
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(index_module, "_event", broken_event)
    with pytest.raises(sqlite3.OperationalError):
        library.record(draft(state), state)
    monkeypatch.undo()
    assert library.versions() == []
    record, new = library.record(draft(state), state)  # and the library still works
    assert new and record.name == "math@v1"


def test_an_edited_expert_file_is_refused(tmp_path):
    library = Library(tmp_path)
    state = experts(1)
    record, _ = library.record(draft(state), state)
    tampered = {k: v.clone() for k, v in state.items()}
    next(iter(tampered.values()))[0, 0] += 1
    import safetensors.torch

    library.experts_path(record.tensors_sha256).write_bytes(safetensors.torch.save(tampered))
    with pytest.raises(LibraryError, match="does not match its digest"):
        library.load_experts(record)


def test_a_draft_whose_digest_differs_from_its_tensors_is_refused(tmp_path):
    state = experts(1)
    with pytest.raises(LibraryError, match="tensors digest"):
        Library(tmp_path).record(draft(state, tensors_sha256="f" * 64), state)


def test_remove_keeps_history_and_latest_falls_back(tmp_path):
    library = Library(tmp_path)
    first, second = experts(1), experts(2)
    library.record(draft(first, cycle=0), first)
    library.record(draft(second, cycle=1), second)
    removed, done = library.remove("math@latest", reason="regressed on code")
    assert done and removed.name == "math@v2" and removed.removed.reason == "regressed on code"
    assert library.get("math@latest").name == "math@v1"
    assert library.get("math@v2").is_removed  # still there, marked
    again, done = library.remove("math@v2")
    assert not done and again.removed.reason == "regressed on code"
    assert [e.kind for e in library.events("math@v2")] == ["record", "remove"]
    assert library.experts_path(removed.tensors_sha256).exists()


def test_a_library_from_a_newer_connito_is_refused(tmp_path):
    Library(tmp_path)
    with sqlite3.connect(tmp_path / INDEX_FILE) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LibraryError, match="schema_version 99"):
        Library(tmp_path)


def test_downstream_evaluations_attach_to_a_version(tmp_path):
    """``record_eval`` (connito owner-eval's hook) keeps every result, in order, with an event."""
    from connito.library import record_eval

    library = Library(tmp_path)
    state = experts(1)
    library.record(draft(state), state)
    record_eval(tmp_path, "math@latest", {"tasks": ["gsm8k"], "results": {"gsm8k": {"acc": 0.25}}})
    record_eval(tmp_path, "math@v1", {"tasks": ["gsm8k"], "results": {"gsm8k": {"acc": 0.5}}})
    assert [e["result"]["results"]["gsm8k"]["acc"] for e in library.evals("math@v1")] == [0.25, 0.5]
    assert [e.kind for e in library.events("math@v1")] == ["record", "eval", "eval"]
    with pytest.raises(LibraryError, match="math@v2"):
        record_eval(tmp_path, "math@v2", {})
