"""The benchmarks' ``--smoke`` runs: they wire the real components and report a sane JSON object.

Each benchmark runs in-process on its built-in tiny domain; the last stdout line must be the JSON
object that ``--out`` wrote, with the metadata every published result carries and values that
obey the benchmark's own definitions. No timing thresholds: only that times were measured.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
METADATA_KEYS = {
    "benchmark",
    "date",
    "device",
    "versions",
    "git_sha",
    "config_path",
    "config_digest",
    "smoke",
}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a benchmark script by name, with ``benchmarks/`` on the path as when run as a script.

    The benchmark sets torch's thread count for the process; put it back for the other tests.
    """
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)


def _run(module: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    out = tmp_path / "result.json"
    # one thread: on a shared 2-core machine two OpenMP threads stall each other at every barrier
    argv = ["--smoke", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    code = module.main(argv)
    stdout = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert len(stdout) > 1, "human-readable lines come before the JSON line"
    result = json.loads(stdout[-1])
    assert json.loads(out.read_text()) == result
    assert METADATA_KEYS <= set(result)
    assert result["smoke"] is True
    assert len(result["config_digest"]) == 64
    assert {"torch", "transformers"} <= set(result["versions"])
    return result


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_validator_eval_smoke_measures_swap_eval_and_reload(bench, tmp_path: Path, capsys) -> None:
    """Every submission is evaluated, the global is restored bit-exactly and the ratios match their parts."""
    result = _run(bench("validator_eval"), tmp_path, capsys)
    assert result["benchmark"] == "validator_eval"
    for key in ("swap_s", "eval_s", "reload_s", "score_wall_s", "submissions_per_minute"):
        assert _positive(result[key]), key
    assert result["swap_fraction"] == pytest.approx(result["swap_s"] / result["eval_s"])
    assert result["reload_over_swap"] == pytest.approx(result["reload_s"] / result["swap_s"])
    assert result["submissions_per_minute"] == pytest.approx(
        60 * result["submissions"] / result["score_wall_s"]
    )
    assert result["submissions"] == 3
    assert result["evaluated"] == result["submissions"], "no synthetic submission may be screened out"
    assert result["global_restored_exactly"] is True
    # smoke scoring: (3 domain + 2 general batches) x 4 sequences x 32 tokens
    assert result["eval_tokens_per_submission"] == (3 + 2) * 4 * 32
    assert len(result["samples_s"]["swap"]) == 5
    assert set(result["targets"]) == {"swap_fraction_le_0.05"}


def test_distributed_vs_central_smoke_trains_both_arms_on_equal_tokens(bench, tmp_path: Path, capsys) -> None:
    """Both arms consume the same tokens, report every cycle, and central training lowers domain loss."""
    result = _run(bench("distributed_vs_central"), tmp_path, capsys)
    assert result["benchmark"] == "distributed_vs_central"
    setup = result["setup"]
    assert setup["residency"] == "subset"
    assert len(result["distributed"]) == len(result["central"]) == setup["cycles"] == 2
    assert result["train_tokens_distributed"] == result["train_tokens_central"] > 0
    assert [p["tokens"] for p in result["distributed"]] == [p["tokens"] for p in result["central"]]
    base, dist, central = result["base"], result["distributed"][-1], result["central"][-1]
    assert central["domain_loss"] < base["domain_loss"]
    ratio = result["domain_loss_reduction_ratio"]
    assert ratio == pytest.approx(
        (base["domain_loss"] - dist["domain_loss"]) / (base["domain_loss"] - central["domain_loss"])
    )
    assert result["general_drift_distributed"] == pytest.approx(
        (dist["general_loss"] - base["general_loss"]) / base["general_loss"]
    )
    assert math.isfinite(result["general_drift_central"])
    assert (tmp_path / "cache" / "base" / "connito_pretrain.json").exists(), "the pretrained base is cached"


def test_validator_load_smoke_evaluates_every_submission_per_fresh_process(
    bench, tmp_path: Path, capsys
) -> None:
    """Both N run a real validator through one cycle; every submission is scored; growth matches its parts."""
    result = _run(bench("validator_load"), tmp_path, capsys)
    assert result["benchmark"] == "validator_load"
    small, large = result["points"]
    assert (small["submissions"], large["submissions"]) == (2, 4) and result["submissions"] == 4
    for point in result["points"]:
        assert point["scored"] == point["evaluated"] == point["submissions"], (
            "no submission may be screened out"
        )
        assert sum(point["outcomes"].values()) == point["submissions"]
        assert _positive(point["wall_s"])
        assert 0 < point["rss_before_bytes"] <= point["peak_rss_bytes"]
        assert point["maxrss_before_bytes"] <= point["maxrss_after_bytes"]
    assert result["wall_s"] == large["wall_s"] and result["peak_rss_bytes"] == large["peak_rss_bytes"]
    assert result["rss_growth_bytes_per_submission"] == pytest.approx(
        (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / 2
    )
    assert result["payload_bytes"] == large["payload_bytes"] > 0
    assert result["growth_vs_payload"] == pytest.approx(
        result["rss_growth_bytes_per_submission"] / result["payload_bytes"]
    )
    # smoke domain: evaluate_blocks 2 at the localnet's 1 s blocks
    assert result["evaluate_window_s"] == 2.0
    assert result["fits_window"] == (result["wall_s"] <= 2.0)
    assert set(result["targets"]) == {"growth_vs_payload_le_1.0", "fits_evaluate_window"}


def test_payload_compression_smoke_compares_int8_with_fp_side_by_side(bench, tmp_path: Path, capsys) -> None:
    """The int8 payload is smaller, both encodings are scored on one sample, and the ratios match their parts."""
    result = _run(bench("payload_compression"), tmp_path, capsys)
    assert result["benchmark"] == "payload_compression"
    sizes = result["payload_bytes"]
    assert 0 < sizes["int8"] < sizes["fp"]
    assert result["payload_ratio"] == pytest.approx(sizes["int8"] / sizes["fp"])
    assert result["payload_ratio_vs_bf16"] == pytest.approx(sizes["int8"] / sizes["fp_bf16"])
    assert sizes["fp_bf16"] < sizes["fp"]  # the smoke model is fp32
    miners = result["miners_detail"]
    assert len(miners) == result["setup"]["miners"] == 2
    utilities = {enc: sum(m[enc]["utility"] for m in miners) for enc in ("fp", "int8")}
    assert result["utility_ratio"] == pytest.approx(utilities["int8"] / utilities["fp"])
    for miner in miners:
        assert miner["fp"]["utility"] == pytest.approx(
            result["global_domain_loss"] - miner["fp"]["domain_loss"]
        )
        assert 0 <= miner["delta_rel_error"] < 0.05 and miner["delta_cosine"] > 0.99
    for key in ("write_fp_s", "write_int8_s", "load_fp_s", "load_int8_s"):
        assert _positive(result["timings_s"][key]), key
