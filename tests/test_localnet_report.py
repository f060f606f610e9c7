"""The localnet report: schema round trip, the terminal table and the plot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connito.localnet.report import CycleReport, LocalnetReport, LossPair, format_cycle_row, render_plot


def _report() -> LocalnetReport:
    rows = [
        CycleReport(
            cycle=c,
            domain_val_loss=2.0 - 0.1 * c,
            general_val_loss=4.0,
            submissions=3,
            accepted=2,
            rejected={"hk-bad": "non_finite"},
            merged=["hk-a"],
            weights={1: 0.75, 2: 0.25},
            global_revision="ab" * 32,
            decision="merged",
        )
        for c in range(3)
    ]
    return LocalnetReport(
        baseline=LossPair(domain_val_loss=2.0, general_val_loss=4.0),
        cycles=rows,
        adversaries={"hk-bad": "nan"},
        selection={"layers": []},
        hotkeys={"hk-a": "m0", "hk-bad": "adv-nan"},
        uids={"hk-a": 1, "hk-bad": 2},
    )


def test_report_json_round_trips():
    report = _report()
    assert LocalnetReport.model_validate_json(report.model_dump_json()) == report


def test_report_rejects_unknown_keys():
    data = _report().model_dump()
    data["cycles"][0]["surprise"] = 1
    with pytest.raises(ValidationError):
        LocalnetReport.model_validate(data)


def test_cycle_row_shows_change_vs_baseline_and_names():
    report = _report()
    line = format_cycle_row(report.cycles[2], report.baseline, report.hotkeys)
    assert "(-10.0% vs base)" in line
    assert "adv-nan:non_finite" in line and "merged: m0" in line
    assert "agree" not in line and "scaled" not in line
    row = report.cycles[2].model_copy(
        update={
            "validator_agreement": 0.987,
            "scaled": {"hotkey": "hk-s", "factor": 2.31, "rank": 3, "unscaled_rank": 3, "accepted": True},
        }
    )
    line = format_cycle_row(row, report.baseline, report.hotkeys)
    assert "validators agree 0.987" in line and "scaled x2.31 rank 3 (unscaled 3)" in line


def test_plot_is_written(tmp_path):
    render_plot(_report(), tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
