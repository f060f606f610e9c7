"""The sparse inner trainer: only selected experts change, optimizer state only for them, exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import MODEL_TYPES, make_selection, random_batch, tiny_model
from safetensors.torch import load, save
from torch.nn.utils import parametrize

from connito.config import TrainingConfig, load_domain_config
from connito.errors import ConfigError
from connito.ml.moe import moe_layers, read_experts
from connito.ml.selection_record import load_domain_selection, save_selection
from connito.ml.subset import extract_subset, write_back
from connito.ml.training import SparseTrainer

SELECTION = {0: [1, 5], 1: [3]}
CFG = TrainingConfig(lr=1e-2, weight_decay=0.1, batch_size=2, grad_clip=1.0)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(n: int) -> list[torch.Tensor]:
    return [random_batch(seed=i) for i in range(n)]


def _assert_only_selected_changed(before: dict, after: dict, selection: dict[int, list[int]]) -> None:
    """Unselected rows of fused expert tensors and every other tensor are byte-identical."""
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(key.split(".")[2])
            for expert in range(before[key].shape[0]):
                same = torch.equal(before[key][expert], after[key][expert])
                assert same != (expert in selection.get(layer, [])), f"{key}[{expert}]"
        else:
            assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_residency_changes_only_selected_experts(model_type):
    """Weight decay 0.1: unselected experts, routers, shared experts, attention, norms stay byte-identical."""
    model = tiny_model(model_type)
    before = _state(model)
    trainer = SparseTrainer(model, SELECTION, CFG)
    trainer.train(_batches(3), 3, progress=False)
    trainer.finish()
    _assert_only_selected_changed(before, _state(model), SELECTION)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_subset_residency_changes_only_selected_experts(model_type):
    """Training a subset and writing it back changes exactly the selected experts of the full model."""
    full = tiny_model(model_type)
    before = _state(full)
    subset = extract_subset(full, SELECTION)
    subset_before = _state(subset.model)
    trainer = SparseTrainer(subset, None, CFG)
    trainer.train(_batches(3), 3, progress=False)
    trained = trainer.finish()
    every_slot = {layer: list(range(len(ids))) for layer, ids in SELECTION.items()}
    _assert_only_selected_changed(subset_before, _state(subset.model), every_slot)  # subset routers too
    write_back(full, subset)
    _assert_only_selected_changed(before, _state(full), SELECTION)
    for key, tensor in read_experts(full, SELECTION).items():
        assert torch.equal(trained[key], tensor), key


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_gradient_checkpointing_changes_nothing_but_memory(model_type):
    """With activation checkpointing the trained experts are the same as without."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(model_type)
        trainer = SparseTrainer(
            model, SELECTION, CFG.model_copy(update={"gradient_checkpointing": checkpointing})
        )
        trainer.train(_batches(2), 2, progress=False)
        results.append(trainer.finish())
        assert not model.is_activation_checkpointing
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6)


def test_optimizer_state_covers_only_selected_experts():
    """AdamW holds exp_avg and exp_avg_sq for the selected experts' parameters and nothing else."""
    model = tiny_model("qwen2_moe")
    trainer = SparseTrainer(model, SELECTION, CFG)
    trainer.step(random_batch())
    layer = moe_layers(model)[0]
    per_expert = 3 * layer.intermediate_size * layer.hidden_size
    selected_params = per_expert * sum(len(v) for v in SELECTION.values())
    assert trainer.trainable_params == selected_params
    moments = sum(v.numel() for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step")
    assert moments == 2 * selected_params
    assert not any(p.requires_grad for p in model.parameters() if p not in {s.master for s in trainer.slices})


def test_step_equals_adamw_on_selected_rows_of_full_gradient():
    """Oracle: one sparse step == AdamW on fp32 copies of the selected rows fed the full model's gradient."""
    cfg = CFG.model_copy(update={"grad_clip": None})
    batch = random_batch()
    reference = tiny_model("qwen3_moe")
    reference.train()
    logits = reference(input_ids=batch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), batch[:, 1:].reshape(-1))
    loss.backward()
    expected = {}
    for layer in moe_layers(reference):
        index = torch.tensor(SELECTION[layer.index])
        for name in ("gate_up_proj", "down_proj"):
            fused = getattr(layer.experts, name)
            master = torch.nn.Parameter(fused.detach().index_select(0, index).clone())
            master.grad = fused.grad.index_select(0, index)
            torch.optim.AdamW([master], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay).step()
            expected[f"{layer.index}.{name}"] = master.detach()
    trainer = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, cfg)
    assert trainer.step(batch) == pytest.approx(float(loss.detach()), rel=1e-6)
    for item in trainer.slices:
        torch.testing.assert_close(item.master.detach(), expected[item.name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("residency", ["full", "subset"])
def test_resume_mid_run_is_bit_exact(model_type, residency):
    """state_dict after 2 steps, saved as safetensors, a fresh trainer + load_state_dict, 2 more steps
    == 4 uninterrupted steps, bit for bit."""
    cfg = CFG.model_copy(update={"grad_accum_steps": 2})
    batches = _batches(8)
    base = tiny_model(model_type)

    def fresh():
        model = copy.deepcopy(base)
        return (extract_subset(model, SELECTION), None) if residency == "subset" else (model, SELECTION)

    straight = SparseTrainer(*fresh(), cfg)
    straight.train(batches, 4, progress=False)
    expected = straight.finish()

    first = SparseTrainer(*fresh(), cfg)
    first.train(batches[:4], 2, progress=False)
    saved = load(save(first.state_dict()))  # the state survives a safetensors round trip
    resumed = SparseTrainer(*fresh(), cfg)
    resumed.load_state_dict(saved)
    assert resumed.step_count == 2
    resumed.train(batches[4:], 2, progress=False)
    got = resumed.finish()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_finish_leaves_a_plain_model():
    """After finish: no parametrizations, original state-dict keys, requires_grad restored, same class."""
    model = tiny_model("deepseek_v2")
    keys = list(model.state_dict())
    classes = {name: type(m) for name, m in model.named_modules()}
    trainer = SparseTrainer(model, SELECTION, CFG.model_copy(update={"gradient_checkpointing": True}))
    assert list(model.state_dict()) != keys  # parametrized while training
    trainer.step(random_batch())
    trained = trainer.finish()
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all(p.requires_grad for p in model.parameters())
    assert not model.is_activation_checkpointing
    for key, tensor in read_experts(model, SELECTION).items():
        assert torch.equal(trained[key], tensor) and trained[key].dtype == torch.float32


def test_finish_returns_original_ids_for_subset():
    """A subset trainer returns canonical keys with the experts' ids in the full model."""
    subset = extract_subset(tiny_model("olmoe"), SELECTION)
    trainer = SparseTrainer(subset, None, CFG)
    trainer.step(random_batch())
    assert set(trainer.finish()) == set(read_experts(tiny_model("olmoe"), SELECTION))


def test_grad_accumulation_averages_over_all_tokens():
    """Two micro-batches of one step give the same update as their concatenation in one micro-batch."""
    cfg = CFG.model_copy(update={"grad_clip": None})
    a, b = random_batch(seed=1), random_batch(seed=2)
    single = SparseTrainer(tiny_model("mixtral"), SELECTION, cfg)
    loss_single = single.step(torch.cat([a, b]))
    accum = SparseTrainer(tiny_model("mixtral"), SELECTION, cfg.model_copy(update={"grad_accum_steps": 2}))
    loss_accum = accum.step([a, b])
    assert loss_accum == pytest.approx(loss_single, rel=1e-5)
    for x, y in zip(single.slices, accum.slices, strict=True):  # exp_avg = (1 - beta1) * grad after one step
        exp_avg_x, exp_avg_y = (
            single.optimizer.state[x.master]["exp_avg"],
            accum.optimizer.state[y.master]["exp_avg"],
        )
        torch.testing.assert_close(exp_avg_x, exp_avg_y, rtol=1e-5, atol=1e-9)


def test_padding_positions_do_not_train():
    """Tokens masked out by attention_mask contribute no loss."""
    batch = random_batch()
    mask = torch.ones_like(batch)
    mask[:, 8:] = 0
    changed_tail = batch.clone()
    changed_tail[:, 9:] = 0
    losses = []
    for ids in (batch, changed_tail):
        trainer = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG)
        losses.append(trainer.step({"input_ids": ids, "attention_mask": mask}))
    assert losses[0] == losses[1]


def test_wrong_micro_batch_count_is_rejected():
    trainer = SparseTrainer(
        tiny_model("qwen3_moe"), SELECTION, CFG.model_copy(update={"grad_accum_steps": 2})
    )
    with pytest.raises(ConfigError, match="grad_accum_steps=2 micro-batches, got 1"):
        trainer.step(random_batch())


def test_resume_state_for_another_selection_is_rejected():
    first = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG)
    other = SparseTrainer(tiny_model("qwen3_moe"), {0: [1, 6], 1: [3]}, CFG)
    with pytest.raises(ConfigError, match="0.gate_up_proj: experts \\[1, 6\\], expected \\[1, 5\\]"):
        first.load_state_dict(other.state_dict())


def test_selection_outside_the_model_is_rejected():
    with pytest.raises(ConfigError, match="layer 0: expert ids must be in 0..7"):
        SparseTrainer(tiny_model("qwen3_moe"), {0: [9]}, CFG)


def test_optimizer_moments_carry_into_the_next_cycles_trainer():
    """A new cycle's trainer takes the last cycle's AdamW moments but its weights and step count
    stay those of the new global: the next step equals AdamW continued from those moments."""
    model = tiny_model("qwen3_moe")
    first = SparseTrainer(model, SELECTION, CFG)
    first.train(_batches(3), 3, progress=False)
    carried = load(save(first.state_dict()))
    first.finish()
    new_global = {k: v + 0.01 for k, v in read_experts(model, SELECTION).items()}
    from connito.ml.moe import write_experts

    write_experts(model, new_global)
    second = SparseTrainer(model, SELECTION, CFG)
    assert second.load_optimizer_moments(carried)
    assert second.step_count == 0
    state = second.state_dict()
    for key, value in carried.items():
        if key.startswith("optim."):
            assert torch.equal(state[key], value), key
    assert all(not torch.equal(state[k], carried[k]) for k in state if k.startswith("master."))
    second.finish()
    assert all(torch.equal(v, new_global[k]) for k, v in read_experts(model, SELECTION).items())


def test_moments_of_other_experts_or_of_no_steps_are_not_carried():
    other = SparseTrainer(tiny_model("qwen3_moe"), {0: [1, 6], 1: [3]}, CFG)
    other.train(_batches(1), 1, progress=False)
    untrained = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG)
    trainer = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG)
    assert not trainer.load_optimizer_moments(other.state_dict())
    assert not trainer.load_optimizer_moments(untrained.state_dict())
    assert trainer.optimizer.state == {}


POOLED = CFG.model_copy(update={"residency": "full", "document_pools": (1,)})


def _experts_per_row_while_training(trainer: SparseTrainer, batch: torch.Tensor) -> list[set[int]]:
    """Each row's experts (non-zero gate) over every MoE layer's routing in one training step."""
    rows: list[set[int]] = []
    handles = []
    for layer in moe_layers(trainer.model):

        def record(_module, _inputs, out, layer=layer.index):
            weights, indices = (
                out[1].view(len(batch), -1, out[1].shape[-1]),
                out[2].view(len(batch), -1, out[2].shape[-1]),
            )
            for row in range(len(batch)):
                rows.append({(layer, int(e)) for e in indices[row][weights[row] > 0].tolist()})

        handles.append(layer.router.register_forward_hook(record))
    trainer.step(batch)
    for handle in handles:
        handle.remove()
    return rows


def test_document_pools_keep_each_training_sequence_inside_its_pool():
    """Pool size 1: during a step every sequence's tokens use one expert per layer; without pools
    they use several. Routers are untouched and the finished model routes as before."""
    batch = random_batch(batch_size=4, seq_len=16)
    plain = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG.model_copy(update={"residency": "full"}))
    assert any(len(used) > 1 for used in _experts_per_row_while_training(plain, batch)), (
        "must be able to fail"
    )
    model = tiny_model("qwen3_moe")
    before = _state(model)
    trainer = SparseTrainer(model, SELECTION, POOLED)
    assert all(len(used) == 1 for used in _experts_per_row_while_training(trainer, batch))
    trainer.finish()
    assert all("forward" not in vars(layer.router) for layer in moe_layers(model))  # own routing back
    _assert_only_selected_changed(before, _state(model), SELECTION)


def test_document_pools_resume_bit_exact():
    """Pool sizes are drawn from (seed, step): a resumed pooled trainer matches an uninterrupted one."""
    cfg = CFG.model_copy(update={"residency": "full", "document_pools": (1, 2, 8)})
    batches = [random_batch(batch_size=4, seed=i) for i in range(4)]
    base = tiny_model("qwen3_moe")
    straight = SparseTrainer(copy.deepcopy(base), SELECTION, cfg)
    straight.train(batches, 4, progress=False)
    expected = straight.finish()
    first = SparseTrainer(copy.deepcopy(base), SELECTION, cfg)
    first.train(batches[:2], 2, progress=False)
    resumed = SparseTrainer(copy.deepcopy(base), SELECTION, cfg)
    resumed.load_state_dict(load(save(first.state_dict())))
    resumed.train(batches[2:], 2, progress=False)
    got = resumed.finish()
    unpooled = SparseTrainer(copy.deepcopy(base), SELECTION, CFG.model_copy(update={"residency": "full"}))
    unpooled.train(batches, 4, progress=False)
    plain = unpooled.finish()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert any(not torch.equal(plain[key], expected[key]) for key in expected), "pools must change training"


def test_document_pools_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="residency: full"):
        TrainingConfig(residency="subset", document_pools=(2,))
    with pytest.raises(ValueError, match="pool sizes >= 1"):
        TrainingConfig(residency="full", document_pools=(0, 2))
    with pytest.raises(ConfigError, match=r"training.document_pools: pool sizes must be in \[1, 8\]"):
        SparseTrainer(tiny_model("qwen3_moe"), SELECTION, POOLED.model_copy(update={"document_pools": (9,)}))
    with pytest.raises(ConfigError, match="full model resident"):
        SparseTrainer(extract_subset(tiny_model("qwen3_moe"), SELECTION), None, POOLED)
    with pytest.raises(ConfigError, match="deepseek_v3: document pools need a softmax top-k router"):
        SparseTrainer(tiny_model("deepseek_v3"), SELECTION, POOLED)


def test_a_neuron_refuses_pools_larger_than_the_model_at_startup(tmp_path):
    """A pool size over the experts per layer fails when the neuron loads its selection, not per tick."""
    config = load_domain_config(
        Path(__file__).resolve().parents[1] / "configs" / "domains" / "tiny-math.yaml"
    )
    path = tmp_path / "selection.json"
    save_selection(make_selection({0: (1,)}, num_experts=8, domain=config.name), path)
    assert load_domain_selection(path, config).domain == config.name  # tiny-math's pools fit 8 experts
    too_large = config.model_copy(
        update={"training": config.training.model_copy(update={"document_pools": (2, 16)})}
    )
    with pytest.raises(ConfigError, match="training.document_pools: pool size 16 exceeds the model's 8"):
        load_domain_selection(path, too_large)
