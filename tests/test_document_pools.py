"""Document expert pools (EMO pretraining): routing stays inside each row's pool, and only while on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batch, tiny_model
from e2e_harness import domain_config

from connito.data import build_domain_data
from connito.errors import UnsupportedModelError
from connito.ml.document_pools import DocumentPools, pool_mask
from connito.ml.moe import moe_layers
from connito.owner.bootstrap import PRETRAIN_MARKER, pretrain_base

POOLED_TYPES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")


def _router_outputs(model, batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weights, indices) of every MoE layer's router for one forward of ``batch``."""
    outputs = []
    handles = [
        layer.router.register_forward_hook(lambda _m, _i, out: outputs.append((out[1].detach(), out[2])))
        for layer in moe_layers(model)
    ]
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_pool_mask_keeps_each_rows_most_preferred_experts():
    logits = torch.zeros(2, 3, 4)
    logits[0, :, 2] = 5.0  # row 0 prefers expert 2, then 0 (one token leans there)
    logits[0, 0, 0] = 4.0
    logits[1, :, 1] = 3.0  # row 1 prefers expert 1, then 3
    logits[1, :, 3] = 2.0
    mask = pool_mask(logits, torch.tensor([2, 1]))
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False]]


@pytest.mark.parametrize("model_type", POOLED_TYPES)
def test_every_token_routes_inside_its_rows_pool(model_type):
    model = tiny_model(model_type)
    batch = random_batch(batch_size=4, seq_len=16)
    unpooled = _experts_used_per_row(_router_outputs(model, batch), rows=len(batch))
    assert any(len(used) > 3 for layer in unpooled for used in layer), "the check must be able to fail"
    pools = DocumentPools(model, [2, 3], seed=0)
    sizes = pools.draw(len(batch))
    with pools:
        pooled = _experts_used_per_row(_router_outputs(model, batch), rows=len(batch))
    for layer, per_row in enumerate(pooled):
        for row, used in enumerate(per_row):
            assert len(used) <= int(sizes[row]), (
                f"layer {layer} row {row} (pool {int(sizes[row])}) used {used}"
            )
    assert any(len(set(per_row)) > 1 for per_row in pooled), "rows should not all share one pool"


def _experts_used_per_row(outputs, *, rows: int) -> list[list[frozenset[int]]]:
    """Per layer, per row: the experts that got a non-zero gate weight from some token of the row."""
    used = []
    for weights, indices in outputs:
        weights, indices = (
            weights.view(rows, -1, weights.shape[-1]),
            indices.view(rows, -1, indices.shape[-1]),
        )
        used.append([frozenset(indices[r][weights[r] > 0].tolist()) for r in range(rows)])
    return used


def test_pool_of_one_is_top_one_routing():
    model = tiny_model("qwen3_moe")
    batch = random_batch(batch_size=2, seq_len=8)
    pools = DocumentPools(model, [1], seed=0)
    pools.draw(len(batch))
    with pools:
        outputs = _router_outputs(model, batch)
    for weights, indices in outputs:
        assert torch.allclose(weights.max(dim=-1).values, torch.ones(len(weights)))
        rows = indices[:, 0].view(len(batch), -1)
        assert all(len(set(row.tolist())) == 1 for row in rows)


def test_leaving_the_block_restores_the_models_own_routing():
    model = tiny_model("qwen3_moe")
    batch = random_batch(batch_size=2, seq_len=16)
    before = _router_outputs(model, batch)
    pools = DocumentPools(model, [2], seed=0)
    pools.draw(len(batch))
    with pools:
        pooled = _router_outputs(model, batch)
    after = _router_outputs(model, batch)
    assert any(not torch.equal(p[1], b[1]) for p, b in zip(pooled, before, strict=True))
    for (w_after, i_after), (w_before, i_before) in zip(after, before, strict=True):
        assert torch.equal(i_after, i_before) and torch.equal(w_after, w_before)
    assert all("forward" not in vars(layer.router) for layer in moe_layers(model))


def test_pooled_forward_trains_and_balances_over_the_batch():
    model = tiny_model("qwen3_moe", router_aux_loss_coef=0.01).train()
    batch = random_batch(batch_size=4, seq_len=16)
    pools = DocumentPools(model, [2, 4, 8], seed=0)
    pools.draw(len(batch))
    with pools:
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    out.loss.backward()
    router_grads = [layer.router.weight.grad for layer in moe_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in router_grads)


def test_draw_is_reproducible_from_the_seed():
    model = tiny_model("qwen3_moe")
    first = [DocumentPools(model, [1, 2, 4, 8], seed=3).draw(16) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert set(first[0].tolist()) <= {1, 2, 4, 8}


def test_forward_without_a_draw_is_an_error():
    model = tiny_model("qwen3_moe")
    with DocumentPools(model, [2], seed=0), pytest.raises(RuntimeError, match="draw"):
        model(input_ids=random_batch())


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_grouped_routers_are_refused(model_type):
    with pytest.raises(UnsupportedModelError, match="softmax top-k"):
        DocumentPools(tiny_model(model_type), [2], seed=0)


@pytest.mark.parametrize("sizes", [[], [0], [9]])
def test_pool_sizes_outside_the_expert_count_are_refused(sizes):
    with pytest.raises(ValueError, match="pool sizes"):
        DocumentPools(tiny_model("qwen3_moe"), sizes, seed=0)


def test_pretrain_records_the_pools_in_its_recipe_and_cache_key(tmp_path):
    config = domain_config()
    data = build_domain_data(config.data, cache_dir=tmp_path / "cache", model=config.model)
    recipe = dict(steps=3, batch_size=4, lr=3e-3, mixture={"math": 1.0}, progress=False)
    plain = pretrain_base(config, data, tmp_path / "plain", **recipe)
    pooled = pretrain_base(config, data, tmp_path / "pooled", document_pools=[4, 2, 2], **recipe)
    marker = json.loads((tmp_path / "pooled" / PRETRAIN_MARKER).read_text())
    assert marker["recipe"]["document_pools"] == [2, 4]
    assert "document_pools" not in json.loads((tmp_path / "plain" / PRETRAIN_MARKER).read_text())["recipe"]
    differs = [
        not torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), pooled.state_dict().values(), strict=True)
    ]
    assert any(differs), "pooled pretraining must route (and so train) differently"
    # a cached base pretrained without pools is not taken for a pooled one, and vice versa
    again = pretrain_base(config, data, tmp_path / "plain", document_pools=[2, 4], **recipe)
    assert json.loads((tmp_path / "plain" / PRETRAIN_MARKER).read_text())["recipe"]["document_pools"] == [
        2,
        4,
    ]
    for a, b in zip(again.state_dict().values(), pooled.state_dict().values(), strict=True):
        assert torch.equal(a, b)
