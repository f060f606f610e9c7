"""benchmarks/run_all.py: discovery, subprocess runs, the report files and the ratio tables.

The real benchmarks take many minutes, so runs use stub scripts in a temporary folder; the table
builder is checked on the saved results in benchmarks/results/.
"""

from __future__ import annotations

import importlib
import json
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

STUB = """
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--out")
{extra}
args = parser.parse_args()
{body}
result = {{"benchmark": "{name}", "device": "stub-device", "date": "2026-01-02T00:00:00+00:00",
          "argv": sys.argv[1:], "ratios": {{"speed_vs_base": 0.5}}, "swap_fraction": None,
          "selected_expert_fraction": 0.125, "targets": {{"speed_le_1": True}}}}
print("human line")
print(json.dumps(result))
open(args.out, "w").write(json.dumps(result))
"""


@pytest.fixture
def run_all(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("run_all")


def _stub(folder: Path, name: str, *, smoke: bool = True, body: str = "") -> None:
    extra = (
        'parser.add_argument("--smoke", action="store_true")\nparser.add_argument("--device")'
        if smoke
        else ""
    )
    (folder / f"{name}.py").write_text(textwrap.dedent(STUB.format(name=name, extra=extra, body=body)))


def test_smoke_run_writes_results_and_table_and_reports_each_outcome(run_all, tmp_path: Path) -> None:
    """--smoke reaches each script that takes it; skips, failures and helpers are handled, the table is built."""
    bench = tmp_path / "bench"
    bench.mkdir()
    _stub(bench, "fast")
    _stub(bench, "nosmoke", smoke=False)
    _stub(bench, "broken", body="sys.exit(3)")
    (bench / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    out = tmp_path / "out"

    code = run_all.main(["--out", str(out), "--smoke", "--device", "cpu", "--benchmarks-dir", str(bench)])

    assert code == 1, "a failed benchmark makes the run fail, after the others ran"
    record = json.loads((out / "results.json").read_text())
    runs = record["benchmarks"]
    assert set(runs) == {"fast", "nosmoke", "broken"}
    assert runs["fast"]["status"] == "ok"
    assert runs["fast"]["result"]["argv"] == ["--out", str(out / "fast.json"), "--smoke", "--device", "cpu"]
    assert runs["nosmoke"]["status"] == "skipped" and "--smoke" in runs["nosmoke"]["detail"]
    assert runs["broken"]["status"] == "failed" and runs["broken"]["returncode"] == 3
    assert (out / "fast.log").read_text().startswith("human line")
    report = (out / "benchmarks.md").read_text()
    assert "| `fast` | `ratios.speed_vs_base` | 0.5 |" in report
    assert "| stub-device |" in report
    assert "`swap_fraction` | n/a" in report, "a ratio the benchmark could not compute is shown, as n/a"
    assert "selected_expert_fraction" not in report, "inputs are not ratios"
    assert "| `fast` | `speed_le_1` | yes |" in report


def test_only_names_unknown_benchmarks(run_all, tmp_path: Path, capsys) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    _stub(bench, "fast")
    assert run_all.main(["--out", str(tmp_path / "o"), "--only", "nope", "--benchmarks-dir", str(bench)]) == 2
    assert "nope" in capsys.readouterr().err


def test_discover_finds_the_shipped_benchmarks(run_all) -> None:
    names = {p.stem for p in run_all.discover(REPO / "benchmarks")}
    assert {"sparse_training", "validator_eval", "distributed_vs_central"} <= names
    assert "run_all" not in names and not any(n.startswith("_") for n in names)


def test_table_from_saved_results_has_each_ratio_with_its_machine(run_all) -> None:
    """Every committed result contributes its ratios, with the value and device it recorded."""
    results = run_all.load_results(RESULTS)
    assert results, "benchmarks/results/ holds the published results"
    table = run_all.ratio_table(results)
    for label, result in results.items():
        rows = run_all.ratios(label, result)
        assert rows, f"{label}: no ratio found"
        for row in rows:
            assert row.device == result["device"]
            assert f"| `{label}` | `{row.key}` | {run_all._fmt(row.value)} |" in table
    sparse = next(r for label, r in results.items() if r["benchmark"] == "sparse_training")
    expected = sparse["ratios"]["sparse_subset_peak_mem_vs_full_finetune"]
    assert f"| {expected:.3g} | peak memory: sparse training in subset residency / full fine-tune |" in table


def test_docs_benchmarks_md_carries_the_table_of_the_committed_results(run_all) -> None:
    """docs/benchmarks.md's generated block is what run_all builds from benchmarks/results/ now."""
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    block = run_all.results_block(run_all.load_results(RESULTS))
    assert run_all.replace_block(doc, block, where="docs/benchmarks.md") == doc, (
        "stale: python benchmarks/run_all.py --from-results benchmarks/results --doc docs/benchmarks.md"
    )
