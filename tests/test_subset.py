"""The expert-subset model: extraction, lazy loading from disk, routing, and merging back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_TYPES, random_batch, tiny_model
from safetensors.torch import load_file, save_file

from connito.config import ModelConfig
from connito.errors import ConfigError
from connito.ml.moe import capture_routing, expert_key, moe_layers, read_experts
from connito.ml.subset import extract_subset, subset_expert_state, write_back
from connito.ml.subset_loading import load_subset_model

SELECTION = {0: [1, 5], 1: [3]}


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones included, as clones."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({k: v.detach().clone() for k, v in model.named_buffers()})
    return state


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_extract_then_write_back_is_bit_identical(model_type):
    """With no training, extracting a subset and writing it back changes no byte of the full model."""
    full = tiny_model(model_type)
    before = _full_state(full)
    subset = extract_subset(full, SELECTION)
    write_back(full, subset)
    _assert_same_tensors(before, _full_state(full))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_write_back_moves_each_slot_to_its_original_expert(model_type):
    """A change to subset slot s lands in original expert expert_ids[s] and nowhere else."""
    full = tiny_model(model_type)
    before = _full_state(full)
    subset = extract_subset(full, SELECTION)
    layer1 = moe_layers(subset.model)[1]
    with torch.no_grad():
        layer1.experts.gate_up_proj[0].add_(1.0)  # slot 0 of layer 1 = original expert 3
    write_back(full, subset)
    after = _full_state(full)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    changed = [e for e in range(8) if not torch.equal(before[fused][e], after[fused][e])]
    assert changed == [3]
    assert all(torch.equal(before[k], after[k]) for k in before if k != fused)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_subset_routing_only_picks_selected_experts(model_type):
    """Routers of the subset return slot ids below the resident count; top_k = min(k, selected)."""
    subset = extract_subset(tiny_model(model_type), SELECTION)
    with capture_routing(subset.model) as recorder:
        subset.model(random_batch())
    for layer in moe_layers(subset.model):
        resident = len(SELECTION[layer.index])
        counts = recorder.stats.token_counts[layer.index]
        assert counts.shape == (resident,)
        assert layer.top_k == min(2, resident)
        assert counts.sum() == recorder.stats.tokens[layer.index] * layer.top_k  # every pick is resident


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t != "deepseek_v3"])
def test_subset_of_all_experts_computes_the_full_model(model_type):
    """Ungrouped routers: a subset holding every expert gives the full model's logits exactly."""
    full = tiny_model(model_type)
    subset = extract_subset(full, {layer.index: list(range(8)) for layer in moe_layers(full)})
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(subset.model(batch).logits, full(batch).logits)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_subset_loaded_from_disk_equals_extracted(model_type, tmp_path):
    """load_subset_model from a save_pretrained folder equals extract_subset bit for bit."""
    full = tiny_model(model_type)
    full.save_pretrained(tmp_path)
    extracted = extract_subset(full, SELECTION)
    loaded = load_subset_model(tmp_path, None, SELECTION)
    _assert_same_tensors(_full_state(extracted.model), _full_state(loaded.model))
    assert loaded.expert_ids == extracted.expert_ids == {0: (1, 5), 1: (3,)}
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(loaded.model(batch).logits, extracted.model(batch).logits)


def test_loaded_subset_holds_only_selected_rows(tmp_path):
    """Memory-light: the loaded model's fused experts and router rows have one row per selected expert."""
    full = tiny_model("deepseek_v3")
    full.save_pretrained(tmp_path)
    subset = load_subset_model(tmp_path, None, SELECTION)
    for layer in moe_layers(subset.model):
        resident = len(SELECTION[layer.index])
        assert layer.experts.gate_up_proj.shape[0] == resident
        assert layer.experts.down_proj.shape[0] == resident
        assert layer.router.weight.shape[0] == resident
        assert layer.router.e_score_correction_bias.shape[0] == resident
    expert_params = {
        layer.index: layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel()
        for layer in moe_layers(full)
    }
    for layer in moe_layers(subset.model):
        resident_params = layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel()
        assert resident_params * 8 == expert_params[layer.index] * len(SELECTION[layer.index])


def test_load_never_reads_unselected_experts(tmp_path):
    """A checkpoint stripped of every unselected expert still loads: those tensors are never read."""
    full = tiny_model("qwen3_moe")
    full.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    keep = {
        expert_key(layer, e, p)
        for layer, ids in SELECTION.items()
        for e in ids
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    state = {k: v for k, v in load_file(path).items() if ".experts." not in k or k in keep}
    save_file(state, path, metadata={"format": "pt"})
    subset = load_subset_model(tmp_path, None, SELECTION)
    assert torch.equal(
        subset_expert_state(subset)[expert_key(0, 5, "up_proj")],
        read_experts(full, {0: [5]})[expert_key(0, 5, "up_proj")],
    )


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    """A checkpoint sharded with model.safetensors.index.json loads the same subset."""
    full = tiny_model("mixtral")
    full.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_subset_model(tmp_path / "sharded", None, SELECTION)
    _assert_same_tensors(_full_state(extract_subset(full, SELECTION).model), _full_state(loaded.model))


def test_fused_checkpoint_format_loads(tmp_path):
    """Experts saved fused (save_original_format=False) are read row by row."""
    full = tiny_model("olmoe")
    full.save_pretrained(tmp_path, save_original_format=False)
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(tmp_path / "model.safetensors"))
    loaded = load_subset_model(tmp_path, None, SELECTION)
    _assert_same_tensors(_full_state(extract_subset(full, SELECTION).model), _full_state(loaded.model))


def test_model_config_sets_dtype(tmp_path):
    """With connito's ModelConfig, the subset is built in its dtype."""
    tiny_model("qwen2_moe").save_pretrained(tmp_path)
    subset = load_subset_model(tmp_path, ModelConfig(id=str(tmp_path), dtype="bfloat16"), SELECTION)
    assert {p.dtype for p in subset.model.parameters()} == {torch.bfloat16}
    assert subset.model(random_batch()).logits.isfinite().all()


def test_subset_state_uses_original_expert_ids():
    """subset_expert_state names experts by their id in the full model, not by slot."""
    full = tiny_model("qwen3_moe")
    state = subset_expert_state(extract_subset(full, SELECTION))
    _assert_same_tensors(state, read_experts(full, SELECTION))


def test_single_expert_layer_routes_under_grouped_routing():
    """DeepSeek-V3 with one resident expert (grouped top-2 impossible) still runs."""
    subset = extract_subset(tiny_model("deepseek_v3"), {0: [6], 1: [0]})
    assert subset.model(random_batch()).logits.isfinite().all()


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({0: [1], 1: [8]}, "layer 1: expert ids must be in 0..7"),
        ({0: [1], 2: [0]}, "layer 2 is not an MoE layer"),
        ({0: [1]}, "none in layers \\[1\\]"),
        ({0: [], 1: [0]}, "layer 0: experts must be non-empty"),
    ],
)
def test_bad_selection_is_rejected_with_its_layer(selection, message):
    with pytest.raises(ConfigError, match=message):
        extract_subset(tiny_model("qwen3_moe"), selection)


def test_missing_tensor_names_the_key(tmp_path):
    full = tiny_model("qwen3_moe")
    full.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(path).items() if k != "model.layers.1.self_attn.q_proj.weight"}
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.layers.1.self_attn.q_proj.weight"):
        load_subset_model(tmp_path, None, SELECTION)
