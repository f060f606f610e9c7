"""``connito select``: fail fast on a refused family or unreachable model, select from scores, check."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import make_selection

from connito.cli import main
from connito.ml.moe_families import REFUSED
from connito.ml.selection_record import load_selection, save_selection

TINY = Path(__file__).resolve().parents[1] / "configs" / "domains" / "tiny-math.yaml"


def _config(tmp_path: Path, **model) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = model
    path = tmp_path / "domain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_select_refuses_an_unsupported_family_in_one_line(tmp_path, capsys):
    path = _config(tmp_path, inline={"model_type": "llama", "vocab_size": 128, "hidden_size": 32})
    assert main(["select", "--config", str(path), "--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_type=llama: no MoE adapter" in err[0]
    assert not (tmp_path / "s.json").exists()


def test_select_on_an_unreachable_model_id_is_one_line(tmp_path, capsys):
    path = _config(tmp_path, id="nobody-here/no-such-moe", revision="main")
    assert main(["select", "--config", str(path), "--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-moe" in err[0] and "config.json" in err[0]


def test_select_from_scores_applies_the_config_rule_and_check_rederives_it(tmp_path, capsys):
    scores = {
        "method": "token_ratio",
        "probe_tokens": {"domain": 4096},
        "layers": [
            {"layer": 0, "scores": [0.05, 0.15, 0.5, 0.3, 0.0, 0.0, 0.0, 0.0]},
            {"layer": 1, "scores": [0.125] * 8},
        ],
    }
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "sel.json"
    assert (
        main(
            [
                "select",
                "--config",
                str(TINY),
                "--from-scores",
                str(tmp_path / "scores.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    selection = load_selection(out)
    assert selection.experts_by_layer == {0: [2], 1: [0, 1]}  # tiny-math: p = 0.2
    assert selection.model_type == "qwen3_moe" and selection.probe_tokens == {"domain": 4096}
    capsys.readouterr()
    assert main(["select", "--check", str(out)]) == 0
    assert "ok method=token_ratio" in capsys.readouterr().out


def test_check_names_a_selection_its_scores_do_not_give(tmp_path, capsys):
    selection = make_selection({0: [1, 2, 3]}, score=0.125)  # uniform scores, p = 0.2: the rule gives [0, 1]
    save_selection(selection, tmp_path / "sel.json")
    assert main(["select", "--check", str(tmp_path / "sel.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 0: experts [1, 2, 3], the rule gives [0, 1]" in err[0]


def test_from_scores_refuses_a_method_other_than_the_configs(tmp_path, capsys):
    scores = {
        "method": "gate_score",
        "probe_tokens": {"domain": 1},
        "layers": [{"layer": 0, "scores": [1.0]}],
    }
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    args = [
        "select",
        "--config",
        str(TINY),
        "--from-scores",
        str(tmp_path / "scores.json"),
        "--out",
        str(tmp_path / "o.json"),
    ]
    assert main(args) == 1
    assert "scores are gate_score, selection.method is token_ratio" in capsys.readouterr().err


def test_a_refused_family_in_the_repository_copy_stops_select_before_any_download(tmp_path, capsys):
    """The model_type is read from configs/models/<org>--<name>.json as JSON: no Hub, no torch needed."""
    (tmp_path / "configs" / "domains").mkdir(parents=True)
    (tmp_path / "configs" / "models").mkdir()
    (tmp_path / "configs" / "models" / "someone--jet.json").write_text(json.dumps({"model_type": "jetmoe"}))
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = {"id": "someone/jet", "revision": "main"}
    path = tmp_path / "configs" / "domains" / "jet.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["select", "--config", str(path), "--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["connito select: model someone/jet: model_type=jetmoe: " + REFUSED["jetmoe"]]
