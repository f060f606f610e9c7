"""``connito library`` verbs, the validators' ``--library`` flag and the localnet's library folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_library_index import draft, experts

from connito.cli import main
from connito.library import Library
from connito.localnet.runner import _neuron_flags
from connito.node.neuron_cli import parse_args


@pytest.fixture
def library(tmp_path) -> Path:
    lib = Library(tmp_path / "lib")
    first, second = experts(1), experts(2)
    v1, _ = lib.record(draft(first, cycle=0), first)
    lib.record(draft(second, cycle=1, parent=v1.tensors_sha256), second)
    return lib.root


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_list_shows_every_version_with_lineage(library, capsys):
    assert main(["library", "list", "--library", str(library), "--json"]) == 0
    body = _json(capsys)
    assert [v["name"] for v in body["versions"]] == ["math@v1", "math@v2"]
    assert body["versions"][1]["parent"] == "math@v1" and body["versions"][1]["contributors"][0]["uid"] == 3
    assert main(["library", "list", "--library", str(library)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("VERSION") and lines[2].startswith("math@v2") and "math@v1" in lines[2]


def test_show_prints_a_version_and_its_history(library, capsys):
    assert main(["library", "show", "math@latest", "--library", str(library), "--json"]) == 0
    body = _json(capsys)
    assert body["name"] == "math@v2" and [e["kind"] for e in body["events"]] == ["record"]


def test_remove_is_recorded_and_latest_falls_back(library, capsys):
    args = ["library", "remove", "math@v2", "--reason", "worse on code", "--library", str(library), "--json"]
    assert main(args) == 0
    assert _json(capsys) == {"removed": "math@v2", "newly_removed": True, "latest": "math@v1"}
    assert main(["library", "list", "--library", str(library), "--json"]) == 0
    removed = _json(capsys)["versions"][1]["removed"]
    assert removed["reason"] == "worse on code"


def test_an_unknown_version_is_one_line_on_stderr_exit_1(library, capsys):
    assert main(["library", "show", "math@v9", "--library", str(library)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("connito library: version 'math@v9'")


def test_a_bad_keep_fraction_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "export",
                "--library",
                str(tmp_path),
                "--domain",
                "m",
                "--keep-fraction",
                "1.5",
                "--out",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2


def test_only_validators_take_library(tmp_path):
    common = ["--config", "c.yaml", "--chain", "local:x"]
    assert parse_args("validator", [*common, "--library", str(tmp_path)]).library == tmp_path
    assert parse_args("validator", common).library is None
    with pytest.raises(SystemExit):
        parse_args("miner", [*common, "--library", str(tmp_path)])


def test_localnet_gives_its_validators_dir_library(tmp_path):
    plan = SimpleNamespace(cycles=3, block_time_s=1.0)
    args = (tmp_path, tmp_path / "d.yaml", tmp_path / "base", tmp_path / "s.json")
    validator = _neuron_flags(*args, "v1", plan)
    miner = _neuron_flags(*args, "m0", plan)
    assert validator[validator.index("--library") + 1] == str(tmp_path / "library")
    assert "--library" not in miner
