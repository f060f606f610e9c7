"""Adapters over transformers 5 MoE blocks: find layers, routers, shared experts, and move experts.

transformers 5 stores each layer's routed experts fused: ``mlp.experts.gate_up_proj`` of shape
``(E, 2*I, H)`` (gate rows first) and ``mlp.experts.down_proj`` of ``(E, H, I)``; the router is
``mlp.gate``. Everything outside connito names one expert by the key ``save_pretrained`` writes:
``model.layers.{L}.mlp.experts.{E}.{gate_proj|up_proj|down_proj}.weight``. This module is the only
place that maps between the two. Reading an expert never aliases model memory; writing one touches
exactly that expert's rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from connito.errors import UnsupportedModelError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PROJECTIONS",
    "MoELayer",
    "RoutingStats",
    "moe_layers",
    "expert_key",
    "parse_expert_key",
    "read_expert",
    "write_expert",
    "read_experts",
    "write_experts",
    "expert_shapes",
    "capture_routing",
]

# model_type -> attribute names of the shared expert modules inside the MoE block.
_SHARED_ATTRS: dict[str, tuple[str, ...]] = {
    "qwen3_moe": (),
    "olmoe": (),
    "mixtral": (),
    "qwen2_moe": ("shared_expert", "shared_expert_gate"),
    "deepseek_v2": ("shared_experts",),
    "deepseek_v3": ("shared_experts",),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_SHARED_ATTRS)
PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True, slots=True, kw_only=True)
class MoELayer:
    """One decoder layer's sparse MoE block, seen through the fused-experts layout."""

    index: int  # decoder layer index L
    block: nn.Module  # the MoE block (``mlp``)
    experts: nn.Module  # fused experts: gate_up_proj (E, 2*I, H), down_proj (E, H, I)
    router: nn.Module  # ``mlp.gate``: returns (logits, top_k_weights, top_k_index)
    shared: tuple[nn.Module, ...]  # shared experts (and their gates); always active, never trained

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """The fused gate and up projections, ``(E, 2*I, H)`` with the gate rows first."""
        return cast(torch.Tensor, self.experts.gate_up_proj)

    @property
    def down_proj(self) -> torch.Tensor:
        """The fused down projections, ``(E, H, I)``."""
        return cast(torch.Tensor, self.experts.down_proj)

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's ``(E, H)`` logit weight."""
        return cast(torch.Tensor, self.router.weight)

    @property
    def num_experts(self) -> int:
        return int(self.gate_up_proj.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.down_proj.shape[-1])

    @property
    def hidden_size(self) -> int:
        return int(self.down_proj.shape[1])

    @property
    def top_k(self) -> int:
        return int(cast(int, self.router.top_k))


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"model_type={_model_type(model)}: no decoder layers at model.layers")
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE layer of ``model``, in layer order (dense layers are skipped).

    Raises:
        UnsupportedModelError: the architecture has no adapter, or its blocks are not the fused
            transformers 5 layout.
    """
    model_type = _model_type(model)
    if model_type not in _SHARED_ATTRS:
        raise UnsupportedModelError(
            f"model_type={model_type}: no MoE adapter (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    found: list[MoELayer] = []
    for index, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        if block is None or experts is None or router is None:
            continue  # a dense layer (DeepSeek first_k_dense_replace, Qwen mlp_only_layers)
        if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
            raise UnsupportedModelError(
                f"model_type={model_type}: layer {index} experts are not fused 3-D tensors (transformers>=5 needed)"
            )
        shared = tuple(getattr(block, name) for name in _SHARED_ATTRS[model_type])
        found.append(MoELayer(index=index, block=block, experts=experts, router=router, shared=shared))
    if not found:
        raise UnsupportedModelError(f"model_type={model_type}: the model has no MoE layers")
    return found


def expert_key(layer: int, expert: int, projection: str) -> str:
    """The canonical checkpoint key of one expert projection (the name ``save_pretrained`` writes)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def parse_expert_key(key: str) -> tuple[int, int, str]:
    """``(layer, expert, projection)`` of a canonical key.

    Raises:
        ValueError: the key is not a canonical expert key.
    """
    match = _KEY_RE.match(key)
    if match is None:
        raise ValueError(f"not an expert key: {key!r}")
    return int(match.group(1)), int(match.group(2)), match.group(3)


def expert_shapes(layer: MoELayer) -> dict[str, tuple[int, int]]:
    """Shape of each projection of one expert in ``layer`` (nn.Linear ``(out, in)`` layout)."""
    hidden, inter = layer.hidden_size, layer.intermediate_size
    return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def read_expert(layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
    """Copies of one expert's three projections, keyed by projection name."""
    inter = layer.intermediate_size
    with torch.no_grad():
        gate_up = layer.gate_up_proj[expert]  # (2*I, H)
        return {
            "gate_proj": gate_up[:inter].detach().clone(),
            "up_proj": gate_up[inter:].detach().clone(),
            "down_proj": layer.down_proj[expert].detach().clone(),  # (H, I)
        }


def write_expert(layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite one expert's rows in the fused tensors, in place; other experts are untouched."""
    inter = layer.intermediate_size
    with torch.no_grad():
        gate_up = layer.gate_up_proj
        down = layer.down_proj
        gate_up[expert, :inter].copy_(tensors["gate_proj"])
        gate_up[expert, inter:].copy_(tensors["up_proj"])
        down[expert].copy_(tensors["down_proj"])


def read_experts(model: nn.Module, selection: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Canonical-key copies of the experts in ``selection`` ({layer: [expert, ...]})."""
    by_index = {layer.index: layer for layer in moe_layers(model)}
    state: dict[str, torch.Tensor] = {}
    for layer_index in sorted(selection):
        layer = by_index[layer_index]
        for expert in sorted(selection[layer_index]):
            for projection, tensor in read_expert(layer, expert).items():
                state[expert_key(layer_index, expert, projection)] = tensor
    return state


def write_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write canonical-key expert tensors into ``model`` (each key's expert rows only).

    Raises:
        ValueError: a key is not canonical, names a missing layer, or an expert is incomplete.
    """
    by_index = {layer.index: layer for layer in moe_layers(model)}
    grouped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer_index, expert, projection = parse_expert_key(key)
        if layer_index not in by_index:
            raise ValueError(f"{key}: layer {layer_index} is not an MoE layer")
        grouped.setdefault((layer_index, expert), {})[projection] = tensor
    for (layer_index, expert), tensors in grouped.items():
        if set(tensors) != set(PROJECTIONS):
            raise ValueError(
                f"expert {layer_index}.{expert}: needs all of {PROJECTIONS}, got {sorted(tensors)}"
            )
        write_expert(by_index[layer_index], expert, tensors)


@dataclass(slots=True)
class RoutingStats:
    """Routing decisions accumulated over probe tokens, per MoE layer.

    ``token_counts[L][e]`` counts tokens whose top-k included expert e; ``gate_sums[L][e]`` sums the
    gate weight those tokens gave e (as the model computed it: its own top-k, bias, grouping and
    renormalisation). ``tokens[L]`` counts the non-padding tokens seen.
    """

    token_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    top_k: dict[int, int] = field(default_factory=dict)


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[_RoutingRecorder]:
    """Record what every router decides during forward passes inside the block.

    Hooks read the routers' actual ``(weights, indices)`` output rather than recomputing top-k
    from logits, which would miss DeepSeek-V3's correction bias and group limits. Call
    ``recorder.set_mask(attention_mask)`` before a forward to exclude padding positions.
    """
    recorder = _RoutingRecorder(moe_layers(model))
    try:
        yield recorder
    finally:
        recorder.close()


class _RoutingRecorder:
    def __init__(self, layers: list[MoELayer]) -> None:
        self.stats = RoutingStats()
        self._mask: torch.Tensor | None = None
        self._handles = []
        for layer in layers:
            self.stats.token_counts[layer.index] = torch.zeros(layer.num_experts, dtype=torch.float64)
            self.stats.gate_sums[layer.index] = torch.zeros(layer.num_experts, dtype=torch.float64)
            self.stats.tokens[layer.index] = 0
            self.stats.top_k[layer.index] = layer.top_k
            self._handles.append(layer.router.register_forward_hook(self._hook_for(layer)))

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Positions to count in the next forwards: ``(B, T)`` with 1 for real tokens."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook_for(self, layer: MoELayer):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
            _logits, weights, indices = output  # weights, indices: (T, k)
            weights = weights.detach().to(torch.float64).cpu()
            indices = indices.detach().cpu()
            if self._mask is not None:
                keep = self._mask.cpu()
                weights, indices = weights[keep], indices[keep]
            num_experts = layer.num_experts
            self.stats.token_counts[layer.index] += torch.bincount(
                indices.reshape(-1), minlength=num_experts
            ).to(torch.float64)[:num_experts]
            self.stats.gate_sums[layer.index].index_add_(0, indices.reshape(-1), weights.reshape(-1))
            self.stats.tokens[layer.index] += int(indices.shape[0])

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
