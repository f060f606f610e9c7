"""The expert-subset model a miner trains in ``subset`` residency, and its merge back.

A subset model is the base model with, in every MoE layer, only the selected experts resident:
the fused ``gate_up_proj`` / ``down_proj`` tensors hold the selected rows (slot s = the s-th
selected expert, ascending), and the router keeps only those rows, so routing can only ever pick
a selected expert. Attention, norms, embeddings, lm_head and shared experts are kept whole.
``SubsetModel.expert_ids`` records slot -> original expert id per layer; it is the only way
back to canonical keys. Building a subset never holds a second copy of all experts: in memory
(``extract_subset``, here) only the selected rows are copied, from disk
(``connito.ml.subset_loading``) only the selected tensors are read. Both fill the skeleton of
``connito.ml.subset_skeleton``.

Routing in a layer that keeps only some experts is an approximation of the full model's, by
construction: the router's softmax (or sigmoid) runs over the selected experts only, top-k
becomes ``min(k, selected)``, and grouped routing is made ungrouped (DeepSeek-V2
``topk_method="greedy"``; DeepSeek-V3, GLM-4.5 and dots1 pick the top-k of ``sigmoid +
e_score_correction_bias`` over the selected experts with no group limit), because the original
groups are meaningless once most of their experts are gone. A layer with every expert resident
keeps the base routing, groups included, so it computes exactly what the base model does.

May import: connito.errors, connito.ml.moe, connito.ml.subset_skeleton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from connito.errors import ConfigError
from connito.ml.moe import moe_layers, read_expert, write_experts
from connito.ml.subset_skeleton import (
    build_skeleton,
    copy_into,
    expert_indexed,
    install_layer,
    router_grouping,
    subset_keys,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SubsetModel",
    "extract_subset",
    "write_back",
    "subset_expert_state",
    "check_selection",
    "check_covers_every_layer",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SubsetModel:
    """A transformers model holding only the selected experts, and the slot -> expert map."""

    model: PreTrainedModel
    expert_ids: dict[int, tuple[int, ...]]  # layer -> original expert id of each slot (ascending)
    full_num_experts: dict[int, int]  # layer -> routed experts in the base model

    @property
    def selection(self) -> dict[int, list[int]]:
        """``{layer: [original expert id, ...]}`` of the resident experts."""
        return {layer: list(ids) for layer, ids in self.expert_ids.items()}

    def slot_of(self, layer: int, expert: int) -> int:
        """The slot that holds original expert ``expert`` of ``layer``.

        Raises:
            ConfigError: the expert is not resident in this subset.
        """
        ids = self.expert_ids.get(layer, ())
        if expert not in ids:
            raise ConfigError(
                f"expert {layer}.{expert} is not in the subset (resident: {list(ids)})", field="selection"
            )
        return ids.index(expert)


def check_selection(
    selection: dict[int, list[int]], num_experts: dict[int, int]
) -> dict[int, tuple[int, ...]]:
    """``selection`` as sorted tuples, checked against the model's MoE layers.

    Raises:
        ConfigError: a layer is not an MoE layer, a layer is empty, or an id is out of range or repeated.
    """
    checked: dict[int, tuple[int, ...]] = {}
    for layer in sorted(selection):
        experts = sorted(int(e) for e in selection[layer])
        if layer not in num_experts:
            raise ConfigError(
                f"layer {layer} is not an MoE layer (MoE layers: {sorted(num_experts)})", field="selection"
            )
        if not experts or len(set(experts)) != len(experts):
            raise ConfigError(
                f"layer {layer}: experts must be non-empty and unique, got {experts}", field="selection"
            )
        if experts[0] < 0 or experts[-1] >= num_experts[layer]:
            raise ConfigError(
                f"layer {layer}: expert ids must be in 0..{num_experts[layer] - 1}, got {experts}",
                field="selection",
            )
        checked[int(layer)] = tuple(experts)
    return checked


def check_covers_every_layer(selection: dict[int, tuple[int, ...]], num_experts: dict[int, int]) -> None:
    # A subset layer with no experts would silently drop that layer's routed output.
    missing = sorted(set(num_experts) - set(selection))
    if missing:
        raise ConfigError(
            f"a subset model needs >= 1 selected expert in every MoE layer; none in layers {missing}",
            field="selection",
        )


def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) by state-dict name, as live objects."""
    table = dict(model.state_dict(keep_vars=True))
    table.update(model.named_buffers())
    return table


def extract_subset(full_model: PreTrainedModel, selection: dict[int, list[int]]) -> SubsetModel:
    """A subset model holding copies of ``selection``'s experts of an in-memory model.

    The full model is only read. Non-expert weights and the selected expert rows are copied (never
    all experts), so training the subset never touches ``full_model``; bring the result back with
    ``write_back``.

    Raises:
        ConfigError: the selection names a non-MoE layer, an out-of-range expert, or leaves an
            MoE layer without experts.
    """
    full_layers = {layer.index: layer for layer in moe_layers(full_model)}
    num_experts = {index: layer.num_experts for index, layer in full_layers.items()}
    chosen = check_selection(selection, num_experts)
    check_covers_every_layer(chosen, num_experts)
    reference = next(full_model.parameters())
    subset = build_skeleton(full_model.config, dtype=reference.dtype, device=reference.device)
    owned = subset_keys(subset)
    source = _tensor_table(full_model)
    for key, target in _tensor_table(subset).items():
        if key not in owned:
            copy_into(target, source[key], key=key, where="<in-memory model>")
    for layer in moe_layers(subset):
        full = full_layers[layer.index]
        index = torch.tensor(chosen[layer.index], device=reference.device)
        with torch.no_grad():
            rows = {
                name: getattr(module, attr).detach().index_select(dim, index)
                for name, (module, attr, dim) in expert_indexed(full, full.num_experts).items()
            }
        install_layer(
            layer,
            rows=rows,
            top_k=full.top_k,
            grouping=router_grouping(full.router),
            complete=len(chosen[layer.index]) == full.num_experts,
        )
    logger.info("subset extracted experts=%d layers=%d", sum(map(len, chosen.values())), len(chosen))
    return SubsetModel(model=subset, expert_ids=chosen, full_num_experts=num_experts)


def subset_expert_state(subset: SubsetModel) -> dict[str, torch.Tensor]:
    """Copies of every resident expert under its family key with its ORIGINAL expert id."""
    state: dict[str, torch.Tensor] = {}
    for layer in moe_layers(subset.model):
        for slot, expert in enumerate(subset.expert_ids[layer.index]):
            for projection, tensor in read_expert(layer, slot).items():
                state[layer.key(expert, projection)] = tensor
    return state


def write_back(full_model: PreTrainedModel, subset: SubsetModel) -> None:
    """Write the subset's experts into their original slots of ``full_model``, in place.

    Only the rows of the resident experts change; every other tensor of ``full_model`` is untouched.

    Raises:
        ConfigError: ``full_model`` does not have the subset's layers and expert counts.
    """
    counts = {layer.index: layer.num_experts for layer in moe_layers(full_model)}
    for layer, count in subset.full_num_experts.items():
        if layer in subset.expert_ids and counts.get(layer) != count:
            raise ConfigError(
                f"layer {layer}: full model has {counts.get(layer)} experts, subset expects {count}",
                field="model",
            )
    write_experts(full_model, subset_expert_state(subset))
