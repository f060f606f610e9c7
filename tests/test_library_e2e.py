"""The library in the running subnet: validators record every published global, and a rebuild from
the chain and the store gives the same index."""

from __future__ import annotations

import json

import pytest
from e2e_harness import build_subnet, domain_config

from connito.library import Library, rebuild_library
from connito.protocol.merge import record_digest
from connito.protocol.phases import phase_bounds

# what only the moment of recording decides; every other field must match a rebuild exactly
_WHEN = {"recorded_at"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two cycles of the in-process subnet; both validators record into one shared library."""
    tmp = tmp_path_factory.mktemp("library-e2e")
    config = domain_config()
    subnet = build_subnet(tmp, config, miners=2, validators=2)
    library = Library(tmp / "library")
    for name in ("v0", "v1"):
        subnet.nodes[name].library = library
    _, end = phase_bounds(1, "merge", config.cycle)
    subnet.run_until(end)
    return subnet, library, tmp


def test_the_lead_records_one_version_per_published_cycle_with_lineage(run):
    subnet, library, _ = run
    lead = subnet.nodes["v0"]
    published = {c: r for c, r in lead.state.results.items() if r.decision in ("merged", "best_single")}
    records = library.versions("tiny-test")
    assert [r.cycle for r in records] == sorted(published) == [0, 1]
    v1, v2 = records
    assert (v1.name, v2.name) == ("tiny-test@v1", "tiny-test@v2")
    assert v1.parent is None and v2.parent == "tiny-test@v1" and v2.parent_revision == v1.tensors_sha256
    assert v2.tensors_sha256 == lead.global_state.revision
    record = lead.global_state.record
    assert v2.merge_record_sha256 == record_digest(record)
    assert [c.hotkey for c in v2.contributors] == [i.hotkey for i in record.inputs]
    assert all(r.store is not None and r.block is not None for r in records)
    assert all(r.domain_loss is not None and r.general_loss is not None for r in records)
    assert v2.domain_loss < v1.domain_loss * 1.05  # measured on one fixed sample: comparable
    experts = library.load_experts(v2)
    assert all((experts[k] == v).all() for k, v in lead.global_state.experts.items())


def test_the_non_lead_adds_nothing_new_to_a_shared_library(run):
    """v1 adopted the same globals: idempotent, so still exactly one version per cycle."""
    subnet, library, _ = run
    assert subnet.nodes["v1"].global_state.revision == subnet.nodes["v0"].global_state.revision
    assert [e.kind for e in library.events()].count("record") == 2


def test_rebuild_from_chain_and_store_equals_the_recorded_index(run):
    subnet, library, tmp = run
    rebuilt = Library(tmp / "rebuilt")
    lead = subnet.nodes["v0"]
    rebuild_library(
        rebuilt,
        chain=subnet.chain,
        store=subnet.store,
        config=subnet.config,
        selection=lead.ctx.selection,
        base_dir=subnet.base_dir,
        data=lead.ctx.data,
    )
    recorded = [r.model_dump(exclude=_WHEN) for r in library.versions()]
    assert [r.model_dump(exclude=_WHEN) for r in rebuilt.versions()] == recorded
    again = rebuild_library(
        rebuilt, chain=subnet.chain, store=subnet.store, config=subnet.config,
        selection=lead.ctx.selection, base_dir=subnet.base_dir, data=lead.ctx.data,
    )  # fmt: skip
    assert [r.name for r in again] == ["tiny-test@v1", "tiny-test@v2"] and len(rebuilt.versions()) == 2


def test_a_library_failure_never_stops_the_validator(run, tmp_path, caplog):
    """A broken library logs an ERROR; the global state was still adopted (record_global returns None)."""
    from connito.library import record_global

    subnet, _, _ = run
    lead = subnet.nodes["v0"]
    broken = Library(tmp_path / "broken")
    (broken.root / "index.sqlite").write_bytes(b"not a database")
    result = record_global(
        broken,
        lead.global_state,
        config=lead.ctx.config,
        selection=lead.ctx.selection,
        chain=lead.ctx.chain,
        base_dir=lead.ctx.base_dir,
        ref=None,
        block=None,
        losses=lambda e, s: (1.0, 2.0),
    )
    assert result is None
    assert "library record failed" in caplog.text


def test_connito_library_rebuild_on_the_run_folder(run, tmp_path, capsys):
    """The CLI form: --config/--chain/--hub/--selection/--base of the run give the same versions."""
    import yaml

    from connito.cli import main

    subnet, library, tmp = run
    config_path = tmp_path / "domain.yaml"
    config_path.write_text(yaml.safe_dump(subnet.config.model_dump(mode="json")))
    code = main(
        [
            "library", "rebuild", "--config", str(config_path), "--chain", f"local:{tmp / 'chain.sqlite'}",
            "--hub", f"local:{tmp / 'hub'}", "--selection", str(tmp / "selection.json"), "--base", str(tmp / "base"),
            "--cache-dir", str(tmp / "cache"), "--library", str(tmp_path / "lib"), "--json",
        ]
    )  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["recorded"] == ["tiny-test@v1", "tiny-test@v2"]
    rebuilt = Library(tmp_path / "lib").versions()
    assert [r.model_dump(exclude=_WHEN) for r in rebuilt] == [
        r.model_dump(exclude=_WHEN) for r in library.versions()
    ]
