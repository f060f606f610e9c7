"""Shaping a transformers model into a subset model: the skeleton and the experts put into it.

A skeleton is the base model with one routed expert per MoE layer and no routing groups;
``install_layer`` then gives a layer exactly the selected experts' rows (of every expert-indexed
tensor: fused weights, expert biases, router weight and bias, correction biases) and makes its
router pick among them only (the routing approximation ``connito.ml.subset`` states). A layer
whose every expert is resident keeps the base model's routing exactly, groups included. The two
subset builders, ``connito.ml.subset.extract_subset`` (from memory) and
``connito.ml.subset_loading.load_subset_model`` (from disk), fill a skeleton through this room.

May import: connito.errors, connito.ml.moe.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from connito.errors import ConfigError
from connito.ml.moe import MoELayer, moe_layers

__all__ = [
    "EXPERT_COUNT_FIELDS",
    "GROUP_FIELDS",
    "build_skeleton",
    "install_layer",
    "expert_indexed",
    "subset_keys",
    "copy_into",
]

# Config fields (or aliases) that hold the routed-expert count, across the supported families.
EXPERT_COUNT_FIELDS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
# Config fields of grouped routing (DeepSeek-V2/V3, GLM-4.5, dots1), restored after the skeleton.
GROUP_FIELDS: tuple[str, ...] = ("n_group", "topk_group", "topk_method")
# Router/block attributes that count experts or hold top-k, rewritten per layer.
_COUNT_ATTRS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
_GROUP_ATTRS: tuple[str, ...] = ("num_group", "n_group", "topk_group", "topk_method")


def _skeleton_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``hf_config`` with one routed expert per layer and no routing groups."""
    config = copy.deepcopy(hf_config)
    for name in EXPERT_COUNT_FIELDS:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, 1)
    for name in ("n_group", "topk_group"):
        if getattr(config, name, None) is not None:
            setattr(config, name, 1)
    if getattr(config, "topk_method", None) is not None:
        config.topk_method = "greedy"
    return config


def build_skeleton(
    hf_config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The model with every layer's experts shrunk to one, weights left uninitialised.

    Every parameter is overwritten afterwards (the loaders check that none is left), so the random
    init is skipped; buffers computed in ``__init__`` (rotary ``inv_freq``) are real, which is why
    this does not use the meta device. The model's config is given back the base model's expert
    count and grouping: per-layer counts live in the modules (``num_experts``, ``top_k``).
    """
    kwargs = {}
    experts_implementation = getattr(hf_config, "_experts_implementation", None)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(_skeleton_config(hf_config), dtype=dtype, **kwargs)
    for name in (*EXPERT_COUNT_FIELDS, *GROUP_FIELDS):
        if hasattr(hf_config, name):
            setattr(model.config, name, getattr(hf_config, name))
    return model.eval()


def expert_indexed(layer: MoELayer, num_experts: int) -> dict[str, tuple[nn.Module, str, int]]:
    """Every tensor of ``layer``'s block indexed by expert: ``name -> (owner module, attr, dim)``.

    Names are relative to the block (``experts.gate_up_proj``, ``gate.weight``,
    ``gate.e_score_correction_bias``, ``expert_bias``). Experts tensors are indexed on dim 0; router
    side tensors (outside the experts and shared modules) on their last dim of size E, which
    covers ERNIE's ``(1, E)`` correction bias.
    """
    found: dict[str, tuple[nn.Module, str, int]] = {}
    shared = {id(module) for module in layer.shared}
    stack: list[tuple[str, nn.Module]] = [("", layer.block)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in shared:
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, tensor in own:
            if tensor is None or tensor.dim() == 0:
                continue
            if module is layer.experts:
                dims = [0] if tensor.shape[0] == num_experts else []
            else:
                dims = [d for d in range(tensor.dim()) if tensor.shape[d] == num_experts]
            if dims:
                found[prefix + attr] = (module, attr, dims[-1])
        stack.extend((f"{prefix}{name}.", child) for name, child in module.named_children())
    return found


def _ungrouped_sigmoid_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DeepSeek-V3 / GLM-4.5 / dots1 routing over a partial subset, without group limits.

    With one group the original forward is the same function, except that it takes a top-2 inside
    each group, which fails for a layer with a single selected expert.
    """
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(
        hidden_states.type(torch.float32), self.weight.type(torch.float32)
    )
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, topk_indices


def _set_counts(layer: MoELayer, count: int, top_k: int) -> None:
    """Rewrite every module's expert count and top-k: the architectures read them in forward."""
    for module in (layer.block, layer.experts, *layer.router.modules()):
        target: Any = module
        for attr in _COUNT_ATTRS:
            if isinstance(getattr(target, attr, None), int):
                setattr(target, attr, count)
        if isinstance(getattr(target, "top_k", None), int):
            target.top_k = min(top_k, count)


def install_layer(
    layer: MoELayer,
    *,
    rows: dict[str, torch.Tensor],  # expert_indexed name -> the n resident experts' slices
    top_k: int,
    grouping: dict[str, Any],  # the base router's group attributes (num_group, topk_group, topk_method)
    complete: bool,  # every expert of the base layer is resident
) -> None:
    """Make ``layer`` (of a skeleton) hold exactly these experts and route only among them.

    A complete layer gets the base router's grouping back, so its routing is the base model's
    exactly; a partial layer routes greedily over the resident experts (groups are meaningless
    once most of their experts are gone).
    """
    targets = expert_indexed(layer, 1)
    if set(rows) != set(targets):
        raise ConfigError(f"expert tensors {sorted(rows)}, expected {sorted(targets)}", field="selection")
    for name, tensor in rows.items():
        module, attr, _dim = targets[name]
        if attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(
                tensor, requires_grad=bool(old is not None and old.requires_grad)
            )
        else:
            module._buffers[attr] = tensor
    count = int(layer.gate_up_proj.shape[0])
    _set_counts(layer, count, top_k)
    router: Any = layer.router
    if complete:
        for attr, value in grouping.items():
            setattr(router, attr, value)
        return
    if hasattr(router, "topk_method"):  # DeepSeek-V2: groups are gone, route greedily
        router.topk_method = "greedy"
    if hasattr(router, "num_group"):
        router.num_group = 1
        router.topk_group = 1
        if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3, GLM-4.5, dots1
            router.forward = types.MethodType(_ungrouped_sigmoid_router_forward, router)


def router_grouping(router: nn.Module) -> dict[str, Any]:
    """The group attributes of a base router, to give back to a complete subset layer."""
    return {attr: getattr(router, attr) for attr in _GROUP_ATTRS if hasattr(router, attr)}


def subset_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the skeleton that the subset installer owns (expert-indexed tensors)."""
    owned: set[str] = set()
    for layer in moe_layers(model):
        prefix = f"model.layers.{layer.index}.{layer.block_name}."
        owned |= {prefix + name for name in expert_indexed(layer, 1)}
    return owned


def copy_into(target: torch.Tensor, source: torch.Tensor, *, key: str, where: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ConfigError(
            f"shape {tuple(source.shape)}, expected {tuple(target.shape)}", path=where, field=key
        )
    with torch.no_grad():
        target.copy_(source)
