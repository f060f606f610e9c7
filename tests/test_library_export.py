"""Export: pruned models are standard transformers checkpoints with the logits of the pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batch, tiny_model
from library_world import record, shared_world, train
from transformers import AutoModelForCausalLM, AutoTokenizer

from connito.cli import main
from connito.errors import LibraryError
from connito.library.export import EXPORT_FILE, expert_param_count, keep_count, prune_model, rank_experts
from connito.ml.moe import RoutingStats, moe_layers, read_expert, read_experts


@pytest.mark.parametrize(
    ("fraction", "kept"), [(0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8), (0.3, 3), (0.01, 1)]
)
def test_keep_count_keeps_at_least_the_fraction(fraction, kept):
    assert keep_count(8, fraction) == kept


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_keep_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(LibraryError, match="keep-fraction"):
        keep_count(8, fraction)


def test_rank_experts_orders_by_tokens_then_gate_mass_then_id():
    stats = RoutingStats(
        token_counts={0: torch.tensor([5.0, 9.0, 5.0, 0.0])},
        gate_sums={0: torch.tensor([1.0, 2.0, 3.0, 0.0])},
        tokens={0: 10},
        top_k={0: 2},
    )
    assert rank_experts(stats) == {0: [1, 2, 0, 3]}


def test_pruned_model_round_trips_through_plain_transformers(model_type, tmp_path):
    """save_pretrained -> from_pretrained gives a model with the pruned model's config and logits."""
    model = tiny_model(model_type)
    keep = {layer.index: [1, 4, 6] for layer in moe_layers(model)}
    pruned = prune_model(model, keep)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(layer.num_experts == 3 for layer in moe_layers(loaded))
    assert loaded.config.num_experts_per_tok == 2
    batch = random_batch()
    with torch.no_grad():
        expected = pruned(input_ids=batch).logits
        got = loaded(input_ids=batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for layer, full in zip(moe_layers(loaded), moe_layers(model), strict=True):
        for slot, expert in enumerate(keep[layer.index]):  # slot s holds the s-th kept expert's weights
            assert all(
                torch.equal(read_expert(layer, slot)[p], v) for p, v in read_expert(full, expert).items()
            )
    assert expert_param_count(loaded) * 8 == expert_param_count(model) * 3


def test_keeping_every_expert_changes_nothing(tmp_path):
    """Oracle: a keep-all export of an ungrouped router has the full model's logits."""
    model = tiny_model("qwen3_moe")
    pruned = prune_model(model, {layer.index: list(range(8)) for layer in moe_layers(model)})
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(input_ids=batch).logits, model(input_ids=batch).logits, rtol=0, atol=1e-6
        )


def test_one_expert_left_is_refused_for_grouped_deepseek_v3():
    model = tiny_model("deepseek_v3")
    with pytest.raises(LibraryError, match="at least 2 experts"):
        prune_model(model, {layer.index: [0] for layer in moe_layers(model)})


def test_uneven_layers_are_refused():
    model = tiny_model("qwen3_moe")
    with pytest.raises(LibraryError, match="same number of experts"):
        prune_model(model, {0: [0, 1], 1: [0]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = shared_world(tmp_path_factory)
    base = world.base_model()
    genesis = read_experts(base, world.math.selection.experts_by_layer)
    world.math_v1 = record(world, world.math, train(base, world.math, steps=40), cycle=0, parent=genesis)
    return world


def test_connito_export_writes_a_checkpoint_plain_transformers_loads(world, tmp_path, capsys):
    """``connito export``: the folder loads with Auto* classes, keeps a quarter of the experts, and
    the reported loss is the reloaded model's on the domain's held-out sample."""
    out = tmp_path / "export"
    code = main(
        [
            "export", "--library", str(world.library.root), "--domain", "tiny-math", "--keep-fraction", "0.25",
            "--out", str(out), "--cache-dir", str(world.root / "cache"), "--eval-batches", "4", "--version", "v1", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "tiny-math@v1" and report["kept_per_layer"] == 4 and report["top_k"] == 2
    assert report["expert_param_fraction"] == pytest.approx(0.25)
    assert report["params_exported"] < report["params_full"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_experts == 4 and len(tokenizer) > 256
    assert (
        json.loads((out / EXPORT_FILE).read_text())["domain_loss_exported"] == report["domain_loss_exported"]
    )
    # the kept experts are the domain's most used ones, so they include the trained math experts
    for layer, experts in world.math.selection.experts_by_layer.items():
        assert set(experts) <= set(report["kept"][str(layer)])
    ids = tokenizer("Tom has 3 apples and buys 4 more.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    card = (out / "README.md").read_text()  # the export's model card: version, lineage, losses
    assert "connito tiny-math@v1" in card and "4 of 16 experts per layer kept" in card
    assert f"{report['domain_loss_exported']:.4f}" in card


def test_connito_library_compose_writes_a_loadable_model(world, tmp_path, capsys):
    out = tmp_path / "composed"
    args = [
        "library",
        "compose",
        "--lanes",
        "tiny-math@v1",
        "--out",
        str(out),
        "--library",
        str(world.library.root),
    ]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lanes"] == {"tiny-math@v1": "tiny-math@v1"}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(AutoTokenizer.from_pretrained(out)) > 256
    expected = world.library.load_experts(world.math_v1)
    held = read_experts(model, world.math.selection.experts_by_layer)
    assert all(torch.equal(held[k], v) for k, v in expected.items())
