"""One adapter over every transformers 5 MoE family: find layers, routers, shared experts, move experts.

transformers 5 stores each layer's routed experts fused in one experts module (``gate_up_proj``
and ``down_proj``, one row per expert along dim 0) next to a router module and, in some families,
shared experts. This module finds those parts by structure, in any block name (``mlp``,
``block_sparse_moe``, ``feed_forward``), and is the only place that maps between a fused row and
the per-expert tensors everything outside connito names by key: the key ``save_pretrained``
writes for that family (``connito.ml.moe_families``). An expert is read and written as
``gate_proj (I, H)``, ``up_proj (I, H)``, ``down_proj (H, I)`` in ``nn.Linear`` layout whatever the
fused layout. Reading an expert never aliases model memory; writing one touches exactly that
expert's rows. Expert biases (gpt-oss) belong to the frozen base, like the router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from connito.errors import UnsupportedModelError
from connito.ml.moe_families import SUPPORTED_MODEL_TYPES, Family, family_of, refusal_reason
from connito.ml.moe_routing import RoutingStats, capture_routing

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PROJECTIONS",
    "MoELayer",
    "RoutingStats",
    "check_model_type",
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

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
_BLOCK_NAMES: tuple[str, ...] = ("mlp", "block_sparse_moe", "feed_forward")
_ROUTER_NAMES: tuple[str, ...] = ("gate", "router")
# Any family's per-expert key; group 3 is the block, group 5 the projection (Mixtral's w1/w3/w2 too).
_KEY_RE = re.compile(
    r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe|feed_forward)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_CANONICAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True, slots=True, kw_only=True)
class MoELayer:
    """One decoder layer's sparse MoE block, seen through its fused experts module."""

    index: int  # decoder layer index L
    block_name: str  # the block's attribute on the decoder layer: mlp | block_sparse_moe | feed_forward
    block: nn.Module  # the MoE block
    experts: nn.Module  # fused experts: gate_up_proj and down_proj, one row per expert
    router: nn.Module  # the block's router module (gate or router)
    shared: tuple[nn.Module, ...]  # shared experts (and their gates); always active, never trained
    family: Family

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """The fused gate and up projections: ``(E, 2*I, H)``, or ``(E, H, 2*I)`` (Llama 4, gpt-oss)."""
        return cast(torch.Tensor, self.experts.gate_up_proj)

    @property
    def down_proj(self) -> torch.Tensor:
        """The fused down projections: ``(E, H, I)``, or ``(E, I, H)`` (Llama 4, gpt-oss)."""
        return cast(torch.Tensor, self.experts.down_proj)

    @property
    def is_transposed(self) -> bool:
        return self.family.layout != "gate_up"

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's ``(E, H)`` logit weight (HunYuan keeps it in ``gate.wg``)."""
        for tensor in self.router.parameters():
            if tuple(tensor.shape) == (self.num_experts, self.hidden_size):
                return tensor
        raise UnsupportedModelError(f"model_type={self.family.model_type}: router has no (E, H) weight")

    @property
    def num_experts(self) -> int:
        return int(self.gate_up_proj.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.down_proj.shape[1] if self.is_transposed else self.down_proj.shape[-1])

    @property
    def hidden_size(self) -> int:
        return int(self.down_proj.shape[-1] if self.is_transposed else self.down_proj.shape[1])

    @property
    def top_k(self) -> int:
        owner = self.router if hasattr(self.router, "top_k") else self.block
        return int(cast(int, owner.top_k))

    def key(self, expert: int, projection: str) -> str:
        """The checkpoint key of one expert projection, as ``save_pretrained`` writes it for this family."""
        return expert_key(self.index, expert, projection, family=self.family)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def check_model_type(model_type: str) -> Family:
    """The family of ``model_type``.

    Raises:
        UnsupportedModelError: one line saying why the family is refused.
    """
    family = family_of(model_type)
    if family is None:
        raise UnsupportedModelError(f"model_type={model_type}: {refusal_reason(model_type)}")
    return family


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"model_type={_model_type(model)}: no decoder layers at model.layers")
    return layers


def _find_block(layer: nn.Module) -> tuple[str, nn.Module, nn.Module, nn.Module] | None:
    """``(name, block, experts, router)`` of a decoder layer's MoE block, or None for a dense layer."""
    for name in _BLOCK_NAMES:
        block = getattr(layer, name, None)
        experts = getattr(block, "experts", None)
        if block is None or experts is None:
            continue
        for router_name in _ROUTER_NAMES:
            router = getattr(block, router_name, None)
            if isinstance(router, nn.Module):
                return name, block, experts, router
    return None


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE layer of ``model``, in layer order (dense and hybrid layers are skipped).

    Raises:
        UnsupportedModelError: the family is refused, or its blocks are not the fused transformers 5 layout.
    """
    model_type = _model_type(model)
    family = check_model_type(model_type)
    found: list[MoELayer] = []
    for index, layer in enumerate(_decoder_layers(model)):
        parts = _find_block(layer)
        if parts is None:
            continue  # a dense layer (DeepSeek first_k_dense_replace, Qwen mlp_only_layers, ...)
        name, block, experts, router = parts
        if name != family.block:  # the family table names keys by this block: keep them in step
            raise UnsupportedModelError(
                f"model_type={model_type}: layer {index} MoE block is {name!r}, expected {family.block!r}"
            )
        if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
            raise UnsupportedModelError(
                f"model_type={model_type}: layer {index} experts are not fused 3-D tensors (transformers>=5 needed)"
            )
        shared = tuple(
            child
            for child_name, child in block.named_children()
            if child is not experts and child is not router and any(True for _ in child.parameters())
        )
        found.append(
            MoELayer(
                index=index,
                block_name=name,
                block=block,
                experts=experts,
                router=router,
                shared=shared,
                family=family,
            )
        )
    if not found:
        raise UnsupportedModelError(f"model_type={model_type}: the model has no MoE layers")
    return found


def expert_key(layer: int, expert: int, projection: str, *, family: Family | None = None) -> str:
    """The checkpoint key of one expert projection.

    With ``family`` it is the key ``save_pretrained`` writes for that family (for a family that
    writes fused tensors, the module path of expert E's slice); without, the qwen/DeepSeek/OLMoE
    form ``model.layers.L.mlp.experts.E.<projection>.weight``.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if family is None:
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"
    disk_block = family.disk_block or family.block
    name = family.disk_names[PROJECTIONS.index(projection)]
    return f"model.layers.{layer}.{disk_block}.experts.{expert}.{name}.weight"


def parse_expert_key(key: str) -> tuple[int, int, str]:
    """``(layer, expert, projection)`` of any family's expert key (projection in ``PROJECTIONS``).

    Raises:
        ValueError: the key is not an expert key.
    """
    match = _KEY_RE.match(key)
    if match is None:
        raise ValueError(f"not an expert key: {key!r}")
    projection = match.group(4)
    return int(match.group(1)), int(match.group(3)), _CANONICAL.get(projection, projection)


def expert_shapes(layer: MoELayer) -> dict[str, tuple[int, int]]:
    """Shape of each projection of one expert in ``layer`` (nn.Linear ``(out, in)`` layout)."""
    hidden, inter = layer.hidden_size, layer.intermediate_size
    return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def split_gate_up(layer: MoELayer, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate (I, H), up (I, H))`` views of one expert's fused ``gate_up_proj`` row."""
    layout = layer.family.layout
    if layout == "gate_up":  # (2*I, H), gate rows first
        gate, up = row.chunk(2, dim=0)
        return gate, up
    if layout == "transposed":  # (H, 2*I), gate columns first
        gate, up = row.chunk(2, dim=-1)
        return gate.t(), up.t()
    return row[:, 0::2].t(), row[:, 1::2].t()  # interleaved (H, 2*I): gpt-oss gate_up[..., ::2]


def down_linear(layer: MoELayer, row: torch.Tensor) -> torch.Tensor:
    """One expert's ``down_proj`` row as an ``(H, I)`` view."""
    return row.t() if layer.is_transposed else row


def read_expert(layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
    """Copies of one expert's three projections in ``nn.Linear`` layout, keyed by projection name."""
    with torch.no_grad():
        gate, up = split_gate_up(layer, layer.gate_up_proj[expert])
        down = down_linear(layer, layer.down_proj[expert])
        return {
            "gate_proj": gate.detach().clone(memory_format=torch.contiguous_format),
            "up_proj": up.detach().clone(memory_format=torch.contiguous_format),
            "down_proj": down.detach().clone(memory_format=torch.contiguous_format),
        }


def write_expert(layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite one expert's rows in the fused tensors, in place; other experts are untouched."""
    with torch.no_grad():
        gate, up = split_gate_up(layer, layer.gate_up_proj[expert])
        gate.copy_(tensors["gate_proj"])
        up.copy_(tensors["up_proj"])
        down_linear(layer, layer.down_proj[expert]).copy_(tensors["down_proj"])


def read_experts(model: nn.Module, selection: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Copies of the experts in ``selection`` ({layer: [expert, ...]}) under the family's keys."""
    by_index = {layer.index: layer for layer in moe_layers(model)}
    state: dict[str, torch.Tensor] = {}
    for layer_index in sorted(selection):
        layer = by_index[layer_index]
        for expert in sorted(selection[layer_index]):
            for projection, tensor in read_expert(layer, expert).items():
                state[layer.key(expert, projection)] = tensor
    return state


def write_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write expert tensors (any family's key form) into ``model`` (each key's expert rows only).

    Raises:
        ValueError: a key is not an expert key, names a missing layer, or an expert is incomplete.
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
