"""The MoE adapter: layer discovery, canonical keys, expert read/write, routing capture."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_TYPES, random_batch, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from connito.errors import UnsupportedModelError
from connito.ml.moe import (
    capture_routing,
    expert_key,
    moe_layers,
    parse_expert_key,
    read_expert,
    read_experts,
    write_expert,
    write_experts,
)


def test_every_family_exposes_its_moe_layers(model_type):
    model = tiny_model(model_type)
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == [0, 1]
    for layer in layers:
        assert layer.num_experts == 8 and layer.top_k == 2
        assert layer.experts.gate_up_proj.shape == (8, 2 * layer.intermediate_size, 32)
    has_shared = model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3")
    assert bool(layers[0].shared) == has_shared


def test_dense_layers_are_skipped():
    model = tiny_model("deepseek_v3", first_k_dense_replace=1)
    assert [layer.index for layer in moe_layers(model)] == [1]


def test_unsupported_architecture_names_its_model_type():
    config = tiny_config("qwen3_moe")
    model = AutoModelForCausalLM.from_config(
        type(config).from_dict({**config.to_dict(), "model_type": "qwen3_moe"})
    )
    model.config.model_type = "llama_like"
    with pytest.raises(UnsupportedModelError, match="model_type=llama_like"):
        moe_layers(model)


def test_expert_key_round_trips():
    key = expert_key(3, 7, "up_proj")
    assert key == "model.layers.3.mlp.experts.7.up_proj.weight"
    assert parse_expert_key(key) == (3, 7, "up_proj")
    for bad in ["model.layers.3.mlp.gate.weight", "model.layers.x.mlp.experts.1.up_proj.weight", ""]:
        with pytest.raises(ValueError):
            parse_expert_key(bad)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_canonical_keys_match_save_pretrained(model_type, tmp_path):
    """read_experts yields exactly the tensors save_pretrained writes under the same names."""
    from safetensors.torch import load_file

    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = read_experts(model, {layer.index: list(range(8)) for layer in moe_layers(model)})
    assert set(ours) <= set(saved)  # Mixtral too: block_sparse_moe.experts.E.w1/w3/w2
    for key, tensor in ours.items():
        assert torch.equal(saved[key], tensor), key


def test_write_expert_touches_only_that_expert(model_type):
    model = tiny_model(model_type)
    layer = moe_layers(model)[1]
    before_gate_up = layer.experts.gate_up_proj.detach().clone()
    before_down = layer.experts.down_proj.detach().clone()
    new = {name: torch.full_like(t, 0.5) for name, t in read_expert(layer, 3).items()}
    write_expert(layer, 3, new)
    after = read_expert(layer, 3)
    assert all(torch.equal(after[name], new[name]) for name in new)
    others = [e for e in range(8) if e != 3]
    assert torch.equal(layer.experts.gate_up_proj[others], before_gate_up[others])
    assert torch.equal(layer.experts.down_proj[others], before_down[others])


def test_read_then_write_experts_is_identity():
    model = tiny_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_experts(model, read_experts(model, {0: [1, 2], 1: [7]}))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_write_experts_rejects_incomplete_expert():
    model = tiny_model("qwen3_moe")
    state = read_experts(model, {0: [1]})
    state.pop(expert_key(0, 1, "down_proj"))
    with pytest.raises(ValueError, match="needs all of"):
        write_experts(model, state)


def test_routing_capture_counts_top_k_per_token(model_type):
    model = tiny_model(model_type)
    batch = random_batch(batch_size=2, seq_len=16)
    with capture_routing(model) as recorder, torch.no_grad():
        model(input_ids=batch)
    stats = recorder.stats
    for layer in moe_layers(model):
        assert stats.tokens[layer.index] == 32
        assert stats.token_counts[layer.index].sum().item() == 32 * 2
    # hooks are removed after the block
    assert all(not layer.router._forward_hooks for layer in moe_layers(model))


def test_routing_capture_excludes_padding():
    model = tiny_model("qwen3_moe")
    batch = random_batch(batch_size=2, seq_len=16)
    mask = torch.ones_like(batch)
    mask[1, 10:] = 0
    with capture_routing(model) as recorder, torch.no_grad():
        recorder.set_mask(mask)
        model(input_ids=batch, attention_mask=mask)
    assert recorder.stats.tokens[0] == 16 + 10


def test_routing_capture_respects_deepseek_v3_bias():
    """With a huge correction bias on expert 5, V3 selects it for every token (the bias only steers choice)."""
    model = tiny_model("deepseek_v3")
    layer = moe_layers(model)[0]
    layer.router.e_score_correction_bias.zero_()
    layer.router.e_score_correction_bias[5] = 100.0
    with capture_routing(model) as recorder, torch.no_grad():
        model(input_ids=random_batch())
    assert recorder.stats.token_counts[0][5].item() == recorder.stats.tokens[0]
