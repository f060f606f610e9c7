"""Shaping a transformers model into a subset model: the skeleton and the experts put into it.

A skeleton is the base model with one routed expert per MoE layer and no routing groups;
``install_layer`` then gives a layer exactly the selected experts' rows and router rows, and
makes its router pick among them only (the routing approximation ``connito.ml.subset`` states).
The two subset builders, ``connito.ml.subset.extract_subset`` (from memory) and
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
    "build_skeleton",
    "install_layer",
    "router_row_names",
    "subset_keys",
    "copy_into",
]

# Config fields (or aliases) that hold the routed-expert count, across the supported families.
EXPERT_COUNT_FIELDS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")


def _skeleton_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``hf_config`` with one routed expert per layer and no routing groups."""
    config = copy.deepcopy(hf_config)
    for name in EXPERT_COUNT_FIELDS:
        if hasattr(config, name):
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
    for name in (*EXPERT_COUNT_FIELDS, "n_group", "topk_group", "topk_method"):
        if hasattr(hf_config, name):
            setattr(model.config, name, getattr(hf_config, name))
    return model.eval()


def _ungrouped_sigmoid_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DeepSeek-V3 routing over the subset without group limits (transformers 5.23 math otherwise).

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


def install_layer(
    layer: MoELayer,
    *,
    gate_up: torch.Tensor,  # (n, 2*I, H)
    down: torch.Tensor,  # (n, H, I)
    router_rows: dict[str, torch.Tensor],  # router param/buffer name -> (n, ...) rows
    top_k: int,
) -> None:
    """Make ``layer`` (of a skeleton) hold exactly these ``n`` experts and route only among them."""
    count = int(gate_up.shape[0])
    # the architectures' own attributes, rewritten in place: typed by the model class, not nn.Module
    experts: Any = layer.experts
    router: Any = layer.router
    block: Any = layer.block
    experts.gate_up_proj = nn.Parameter(gate_up)
    experts.down_proj = nn.Parameter(down)
    experts.num_experts = count
    for name, rows in router_rows.items():
        if name in router._parameters:
            setattr(router, name, nn.Parameter(rows, requires_grad=router._parameters[name].requires_grad))
        else:
            router._buffers[name] = rows
    router.num_experts = count
    router.top_k = min(top_k, count)
    if hasattr(block, "top_k"):  # Mixtral keeps a copy on the block
        block.top_k = router.top_k
    if hasattr(router, "topk_method"):  # DeepSeek-V2: groups are gone, route greedily
        router.topk_method = "greedy"
    if hasattr(router, "num_group"):
        router.num_group = 1
        router.topk_group = 1
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3
        router.forward = types.MethodType(_ungrouped_sigmoid_router_forward, router)


def router_row_names(router: nn.Module, num_experts: int) -> list[str]:
    """Router tensors indexed by expert along dim 0 (``weight``, DeepSeek-V3's correction bias)."""
    names = [
        n for n, p in router.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts
    ]
    names += [n for n, b in router.named_buffers(recurse=False) if b.dim() >= 1 and b.shape[0] == num_experts]
    return names


def subset_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the skeleton that the subset installer owns (experts and router rows)."""
    owned: set[str] = set()
    for layer in moe_layers(model):
        prefix = f"model.layers.{layer.index}.mlp"
        owned |= {f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"}
        owned |= {f"{prefix}.gate.{name}" for name in router_row_names(layer.router, 1)}
    return owned


def copy_into(target: torch.Tensor, source: torch.Tensor, *, key: str, where: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ConfigError(
            f"shape {tuple(source.shape)}, expected {tuple(target.shape)}", path=where, field=key
        )
    with torch.no_grad():
        target.copy_(source)
