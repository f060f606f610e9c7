"""``connito owner-eval``: the global model reaches lm-evaluation-harness and its result is recorded.

lm-evaluation-harness is not installed here (and must not be): a fake ``lm_eval`` injected into
``sys.modules`` stands in for it and records what it was called with. Everything else is real: a
tiny base model on disk, a global expert state written the way the lead validator writes it, the
strict loader, the CLI.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_selection
from e2e_harness import TINY_DOMAIN
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from connito.cli import main
from connito.config import load_domain_config
from connito.ml.modeling import build_model, load_model
from connito.ml.moe import read_experts
from connito.ml.selection_record import save_selection
from connito.protocol.global_state import genesis_global, save_global

SELECTED = {0: [1, 5], 1: [2]}


class FakeHarness:
    """``lm_eval`` and ``lm_eval.models.huggingface`` as two modules that remember their calls."""

    def __init__(self) -> None:
        self.hflm_kwargs: dict = {}
        self.evaluate_kwargs: dict = {}
        harness = self

        class HFLM:
            def __init__(self, **kwargs) -> None:
                harness.hflm_kwargs = kwargs

        def simple_evaluate(**kwargs):
            harness.evaluate_kwargs = kwargs
            return {
                "results": {
                    "gsm8k": {
                        "alias": "gsm8k",
                        "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": 0.1,
                    },
                    "mmlu": {"alias": "mmlu", "acc,none": 0.5, "flag": True},
                },
                "samples": {"gsm8k": ["not kept"]},
            }

        self.lm_eval = types.ModuleType("lm_eval")
        self.lm_eval.simple_evaluate = simple_evaluate
        self.lm_eval.__version__ = "0.4.fake"
        self.huggingface = types.ModuleType("lm_eval.models.huggingface")
        self.huggingface.HFLM = HFLM

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "lm_eval", self.lm_eval)
        monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
        monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", self.huggingface)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A domain YAML, a saved base model with a tokenizer, its selection, and a global state folder."""
    config_path = tmp_path / "domain.yaml"
    config_path.write_text(yaml.safe_dump(TINY_DOMAIN))
    config = load_domain_config(config_path)
    model = build_model(config.model)
    base = tmp_path / "base"
    model.save_pretrained(base)
    vocab = {"<eos>": 0, "<unk>": 1, "two": 2, "plus": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        base
    )
    num_experts = TINY_DOMAIN["model"]["inline"]["num_experts"]
    selection = make_selection(
        SELECTED,
        num_experts=num_experts,
        domain=config.name,
        model_id=config.model.name,
        model_revision="test-base",
        probe_tokens=64,
    )
    save_selection(selection, tmp_path / "selection.json")
    trained = {
        key: tensor + 0.5 for key, tensor in read_experts(model, SELECTED).items()
    }  # what merges produced
    save_global(
        genesis_global(trained), tmp_path / "global", config=config, selection=selection, hotkey="5Lead"
    )
    return {
        "config": config_path,
        "base": base,
        "selection": tmp_path / "selection.json",
        "global": tmp_path / "global",
    }


def _argv(world: dict[str, Path], *extra: str) -> list[str]:
    return [
        "owner-eval",
        "--config", str(world["config"]),
        "--model", str(world["global"]),
        "--selection", str(world["selection"]),
        "--base", str(world["base"]),
        "--version", "tiny-test@v1",
        "--tasks", "gsm8k,mmlu",
        "--limit", "5",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def test_missing_harness_fails_in_one_line_naming_the_install(world, monkeypatch, capsys) -> None:
    """Without lm_eval the command exits 1 before loading any weights, with the pip line."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of lm_eval now fails as if absent
    assert main(_argv(world)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install lm-eval" in err[0]


def test_global_model_reaches_the_harness_and_the_result_is_recorded(
    world, monkeypatch, tmp_path, capsys
) -> None:
    """HFLM gets the base model holding the global experts; the tasks and limit pass through; record_eval gets it."""
    fake = FakeHarness()
    fake.install(monkeypatch)
    recorded: list[tuple] = []
    library = types.ModuleType("connito.library")
    library.record_eval = lambda path, version, results: recorded.append((path, version, results))
    monkeypatch.setitem(sys.modules, "connito.library", library)

    assert main(_argv(world, "--record-in", str(tmp_path / "lib"), "--num-fewshot", "0")) == 0

    model = fake.hflm_kwargs["pretrained"]
    base = read_experts(load_model(world["base"], load_domain_config(world["config"]).model), SELECTED)
    for key, tensor in read_experts(model, SELECTED).items():
        assert torch.equal(tensor, base[key] + 0.5), (
            f"{key}: the evaluated model must hold the global experts"
        )
    assert fake.hflm_kwargs["tokenizer"].eos_token == "<eos>"
    assert fake.evaluate_kwargs == {
        "model": fake.evaluate_kwargs["model"],
        "tasks": ["gsm8k", "mmlu"],
        "limit": 5,
        "num_fewshot": 0,
    }
    assert isinstance(fake.evaluate_kwargs["model"], fake.huggingface.HFLM)

    assert len(recorded) == 1
    path, version, results = recorded[0]
    assert (path, version) == (tmp_path / "lib", "tiny-test@v1")
    assert results["results"]["gsm8k"]["exact_match,strict-match"] == 0.25
    assert "flag" not in results["results"]["mmlu"], "booleans are not metrics"
    assert results["harness_version"] == "0.4.fake" and results["global_revision"]
    on_disk = json.loads((world["global"] / "owner-eval-tiny-test@v1.json").read_text())
    assert on_disk == results
    assert "gsm8k: exact_match,strict-match=0.2500" in capsys.readouterr().out


def test_without_library_support_the_json_next_to_the_model_is_the_record(world, monkeypatch, caplog) -> None:
    """A connito.library without record_eval is no failure: the JSON is written and a WARNING says so."""
    FakeHarness().install(monkeypatch)
    monkeypatch.setitem(sys.modules, "connito.library", types.ModuleType("connito.library"))
    assert main(_argv(world, "--record-in", str(world["base"].parent / "lib"))) == 0
    assert (world["global"] / "owner-eval-tiny-test@v1.json").is_file()
    assert "record_eval" in caplog.text


def test_global_state_needs_the_selection(world, monkeypatch, capsys) -> None:
    FakeHarness().install(monkeypatch)
    argv = _argv(world)
    index = argv.index("--selection")
    del argv[index : index + 2]
    assert main(argv) == 1
    assert "--selection" in capsys.readouterr().err


def test_a_library_version_is_evaluated_on_its_base(world, monkeypatch, tmp_path) -> None:
    """--library LIB --version V: the real library composes V onto its base; that model is evaluated."""
    from connito.config import config_digest
    from connito.library import Contributor, Library, VersionDraft
    from connito.ml.selection_record import load_selection
    from connito.protocol.merge import state_revision

    fake = FakeHarness()
    fake.install(monkeypatch)
    config = load_domain_config(world["config"])
    selection = load_selection(world["selection"])
    base = read_experts(load_model(world["base"], config.model), SELECTED)
    version_experts = {key: tensor - 0.25 for key, tensor in base.items()}
    library = Library(tmp_path / "lib")
    library.put_domain(config, selection)
    library.put_base(selection.model_id, selection.model_revision, str(world["base"]))
    revision = state_revision(version_experts)
    draft = VersionDraft(
        domain=config.name,
        model_id=selection.model_id,
        model_revision=selection.model_revision,
        selection_digest=selection.digest,
        config_digest=config_digest(config),
        cycle=0,
        tensors_sha256=revision,
        store=None,
        domain_loss=None,
        general_loss=None,
        eval_seed=None,
        parent_revision=state_revision(base),
        decision="best_single",
        contributors=(Contributor(hotkey="5Miner", uid=1, weight=1.0, tensors_sha256=revision),),
        merge_record_sha256="0" * 64,
        lead_hotkey="5Lead",
        block=None,
    )
    library.record(draft, version_experts)
    argv = ["owner-eval", "--config", str(world["config"]), "--library", str(tmp_path / "lib"),
            "--version", "tiny-test@latest", "--tasks", "gsm8k", "--device", "cpu"]  # fmt: skip

    assert main(argv) == 0

    evaluated = read_experts(fake.hflm_kwargs["pretrained"], SELECTED)
    assert all(torch.equal(evaluated[key], version_experts[key]) for key in evaluated)
    saved = json.loads((tmp_path / "lib" / "owner-eval-tiny-test@latest.json").read_text())
    assert saved["global_revision"] == revision and saved["model_source"].startswith("library:")
