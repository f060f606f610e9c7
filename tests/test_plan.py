"""``connito plan``: figures from config.json alone, consistent with the model and the selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_selection, tiny_model

from connito.cli import main
from connito.config import load_domain_config
from connito.ml.memory_plan import TRAINABLE_BYTES_PER_PARAM, estimate_memory, meta_model, model_shape
from connito.ml.selection_record import save_selection
from connito.owner.plan import build_plan

DOMAINS = Path(__file__).resolve().parents[1] / "configs" / "domains"
REAL = sorted(p for p in DOMAINS.glob("math-*.yaml"))


def test_meta_shape_matches_the_instantiated_model():
    model = tiny_model("deepseek_v2")
    shape = model_shape(meta_model(model.config, torch.float32))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.expert_params == {0: 3 * 16 * 32, 1: 3 * 16 * 32}
    assert shape.routed_params == 2 * 8 * 3 * 16 * 32


def test_subset_residency_holds_only_the_selected_experts():
    shape = model_shape(meta_model(tiny_model("qwen3_moe").config, torch.float32))
    selected = {0: 2, 1: 3}
    full = estimate_memory(shape, selected, residency="full", dtype_bytes=4, micro_batch=1, sequence_length=8)
    subset = estimate_memory(
        shape, selected, residency="subset", dtype_bytes=4, micro_batch=1, sequence_length=8
    )
    unselected = (8 - 2 + 8 - 3) * 3 * 16 * 32
    assert full.weights - subset.weights == unselected * 4
    assert full.trainable == subset.trainable == TRAINABLE_BYTES_PER_PARAM * 5 * 3 * 16 * 32
    assert full.total == full.weights + full.trainable + full.fused_gradient + full.activations


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_plan_of_every_shipped_real_config_runs_offline(path, capsys):
    """Only the configs/models copy of config.json is read: HF_HUB_OFFLINE is set for the suite."""
    assert main(["plan", "--config", str(path), "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "total (checkpointed)" in out and "GPU 80 GiB" in out and "submissions per" in out


def test_plan_uses_the_selection_and_its_payload_sizes(tmp_path, capsys):
    path = DOMAINS / "math-olmoe-1b-7b.yaml"
    selection = make_selection({0: [1, 2, 3], 5: [7]}, num_experts=64, model_id="allenai/OLMoE-1B-7B-0924")
    save_selection(selection, tmp_path / "sel.json")
    assert main(["plan", "--config", str(path), "--selection", str(tmp_path / "sel.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    expert = 3 * 2048 * 1024  # OLMoE: hidden 2048, expert intermediate 1024
    assert plan["selected_experts"] == 4 and plan["selected_params"] == 4 * expert
    assert plan["payload_bf16_bytes"] == 2 * plan["selected_params"]
    assert plan["payload_int8_bytes"] == 4 * (expert + 4 * (2 * 1024 + 2048))


def test_gpu_verdict_follows_the_configured_checkpointing():
    path = DOMAINS / "math-qwen3-30b-a3b.yaml"
    config = load_domain_config(path)
    plan = build_plan(config, config_path=path, gpu_mem_gib=40)
    full, subset = plan.residencies
    assert config.training.gradient_checkpointing
    assert full.fits is (full.memory.total_checkpointed <= 40 * 2**30)
    assert subset.fits is (subset.memory.total_checkpointed <= 40 * 2**30)
    assert not full.fits and subset.fits  # 57 GiB of weights cannot fit; the subset does
