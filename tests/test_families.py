"""Every supported MoE family, exact: connito computes what plain transformers computes.

Per family (tiny random configs, fp32): held-out loss equals ``AutoModelForCausalLM``'s own
loss; a subset with every expert resident equals the full model (grouped routing included);
sparse training changes only the selected experts in what ``save_pretrained`` writes; a library
export reloads in plain transformers with the same logits; expert keys are the keys
``save_pretrained`` writes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_TYPES, random_batch, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from connito.config import TrainingConfig
from connito.errors import UnsupportedModelError
from connito.library.export import prune_model
from connito.ml.modeling import heldout_loss
from connito.ml.moe import check_model_type, moe_layers, read_experts
from connito.ml.moe_families import FAMILIES, SUPPORTED_MODEL_TYPES
from connito.ml.subset import extract_subset
from connito.ml.subset_loading import load_subset_model
from connito.ml.training import SparseTrainer


def _selection(model: torch.nn.Module) -> dict[int, list[int]]:
    """Two experts in every MoE layer (some families make layer 0 dense by default)."""
    picks = ([1, 5], [3, 6])
    return {layer.index: picks[i % 2] for i, layer in enumerate(moe_layers(model))}


# Fused expert tensors as written to disk (Granite keeps its original input_linear/output_linear).
_FUSED_ON_DISK = ("gate_up_proj", "down_proj", "input_linear.weight", "output_linear.weight")


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, use_cache=False).logits


def test_every_supported_family_has_a_tiny_config():
    assert set(FAMILY_TYPES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_heldout_loss_equals_transformers(model_type):
    model = tiny_model(model_type)
    batches = [random_batch(2, 16, seed=s) for s in range(2)]
    ours = heldout_loss(model, batches)
    with torch.no_grad():
        theirs = [model(input_ids=b, labels=b).loss.item() for b in batches]
    assert abs(ours - sum(theirs) / len(theirs)) <= 1e-6


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_all_resident_subset_equals_full_model(model_type):
    """Every expert resident: same logits bit for bit, DeepSeek-V3/GLM/dots1 group limits included."""
    full = tiny_model(model_type)
    subset = extract_subset(full, {layer.index: list(range(8)) for layer in moe_layers(full)})
    batch = random_batch(2, 16, seed=3)
    assert torch.equal(_logits(subset.model, batch), _logits(full, batch))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_subset_read_from_disk_equals_full_model(model_type, tmp_path):
    """load_subset_model reads the family's saved names; families it cannot read say so in one line."""
    full = tiny_model(model_type)
    full.save_pretrained(tmp_path)
    every = {layer.index: list(range(8)) for layer in moe_layers(full)}
    if not FAMILIES[model_type].disk_subset:
        with pytest.raises(UnsupportedModelError, match=f"model_type={model_type}: a subset cannot be read"):
            load_subset_model(tmp_path, None, every)
        return
    subset = load_subset_model(tmp_path, None, every)
    batch = random_batch(2, 16, seed=6)
    assert torch.equal(_logits(subset.model, batch), _logits(full, batch))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_partial_subset_runs_and_routes_only_resident_experts(model_type):
    full = tiny_model(model_type)
    subset = extract_subset(full, _selection(full))
    logits = _logits(subset.model, random_batch(2, 16, seed=4))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_training_changes_only_selected_experts_on_disk(model_type, tmp_path):
    """What save_pretrained writes differs only in the selected experts' tensors (or fused rows)."""
    model = tiny_model(model_type)
    selection = _selection(model)
    model.save_pretrained(tmp_path / "before")
    trainer = SparseTrainer(model, selection, TrainingConfig(lr=1e-2, weight_decay=0.1, batch_size=2))
    trainer.train([random_batch(seed=i) for i in range(2)], 2, progress=False)
    payload = trainer.finish()
    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    selected_keys = set(read_experts(model, selection))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    if FAMILIES[model_type].disk_fused:  # one fused tensor per layer: check its rows
        for key in changed:
            layer = int(key.split(".")[2])
            rows = [e for e in range(8) if not torch.equal(before[key][e], after[key][e])]
            assert key.endswith(_FUSED_ON_DISK) and rows == selection[layer], key
        assert len(changed) == 2 * len(selection)
    else:  # the payload overlays the base checkpoint by key (Mixtral's w1/w3/w2 included)
        assert changed == selected_keys == set(payload)
        overlaid = {**before, **payload}
        assert all(torch.equal(overlaid[key], after[key]) for key in after)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_expert_keys_are_the_keys_save_pretrained_writes(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = read_experts(model, {layer.index: list(range(8)) for layer in moe_layers(model)})
    if FAMILIES[model_type].disk_fused:  # no per-expert key on disk: our key names the fused slice
        assert not set(ours) & set(saved)
        layers = {layer.index: layer for layer in moe_layers(model)}
        for key, tensor in ours.items():
            layer_index, expert = int(key.split(".")[2]), int(key.split(".")[5])
            assert key.startswith(f"model.layers.{layer_index}.{layers[layer_index].block_name}.experts.")
            assert tensor.shape in {(16, 32), (32, 16)}
            assert tensor.dtype == saved[next(iter(saved))].dtype
            del expert
    else:
        assert set(ours) <= set(saved)
        for key, tensor in ours.items():
            assert torch.equal(saved[key], tensor), key


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fidelity_export_reloads_in_transformers_with_same_logits(model_type, tmp_path):
    model = tiny_model(model_type)
    pruned = prune_model(model, {layer.index: [0, 2, 5, 7] for layer in moe_layers(model)})
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = random_batch(2, 16, seed=5)
    assert torch.allclose(_logits(reloaded, batch), _logits(pruned, batch), atol=1e-6, rtol=0)


def test_unknown_family_is_refused_in_one_line():
    with pytest.raises(UnsupportedModelError, match=r"^model_type=llama: no MoE adapter") as info:
        check_model_type("llama")
    assert "\n" not in str(info.value)
    assert tiny_config("qwen3_moe").model_type in SUPPORTED_MODEL_TYPES
