"""The trained slices of the fused expert tensors: fp32 masters spliced into a frozen model.

transformers 5 fuses each layer's experts into one ``(E, 2*I, H)`` / ``(E, H, I)`` tensor, and
``requires_grad`` is per tensor, so "train experts 3 and 7" cannot be said with the tensor
itself. Masking the gradient is wrong: AdamW's decoupled weight decay and its state would touch
every expert (ml-methods §4.4). Instead the whole model is frozen, and each selected slice gets
an fp32 master ``nn.Parameter`` that is the only thing the optimizer sees:

- the fused tensor's selected rows always hold ``master.to(model dtype)`` (``write_masters``,
  called after every optimizer step, outside any autograd graph);
- a parametrization (``splice``) hands the expert kernel the fused tensor itself, through
  ``_RowsToMaster``, whose backward sends the selected rows of the weight gradient to the master.
  So the forward is the frozen model's own, no spliced copy of the fused tensor is kept for
  backward, and the full weight gradient lives only for one layer's backward.

``unsplice`` removes the parametrizations again; ``trained_experts`` reads the masters back
under canonical keys with ORIGINAL expert ids. The trainer (``connito.ml.training``) drives these.

May import: connito.errors, connito.ml.distributed, connito.ml.moe, connito.ml.subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from connito.errors import ConfigError
from connito.ml.distributed import write_rows_
from connito.ml.moe import MoELayer, down_linear, moe_layers, split_gate_up
from connito.ml.subset import SubsetModel, check_selection

__all__ = [
    "FUSED_TENSORS",
    "ExpertSlice",
    "make_slices",
    "splice",
    "unsplice",
    "write_masters",
    "trained_experts",
]

FUSED_TENSORS: tuple[str, ...] = ("gate_up_proj", "down_proj")


class _RowsToMaster(torch.autograd.Function):
    """Identity on the fused tensor; the gradient of rows ``index`` goes to ``master``.

    Valid because the fused tensor's rows ``index`` equal ``master`` cast to its dtype (the trainer
    keeps it so), which makes this the derivative of ``fused.index_put((index,), master.to(dtype))``.
    """

    @staticmethod
    def forward(ctx, master: torch.Tensor, fused: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.master_dtype = master.dtype
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index).to(ctx.master_dtype), None, None


class _Splice(nn.Module):
    """Parametrization of one fused expert tensor: trainable master rows ``index`` of it."""

    def __init__(self, index: torch.Tensor, master: nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.master = master  # (n, 2*I, H) or (n, H, I), fp32

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return _RowsToMaster.apply(self.master, fused, self.index)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertSlice:
    """One trained slice: rows ``slots`` of ``experts.<tensor>`` of MoE layer ``layer``."""

    layer: int
    tensor: str  # "gate_up_proj" | "down_proj"
    experts: nn.Module
    slots: tuple[int, ...]  # rows in the fused tensor
    expert_ids: tuple[int, ...]  # original expert ids of those rows (== slots in full residency)
    master: nn.Parameter
    layer_view: MoELayer  # the layer, for its fused layout and its family's expert keys

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.tensor}"

    @property
    def fused(self) -> torch.Tensor:
        """The fused parameter itself (under the parametrization while training)."""
        experts: Any = self.experts  # parametrizations is added at run time
        if parametrize.is_parametrized(experts, self.tensor):
            return cast(torch.Tensor, experts.parametrizations[self.tensor].original)
        return cast(torch.Tensor, getattr(experts, self.tensor))

    def row_index(self) -> torch.Tensor:
        """``slots`` as an index tensor on the master's device."""
        return torch.tensor(self.slots, device=self.master.device)


def make_slices(
    model: nn.Module,
    selection: dict[int, list[int]] | None,
    *,
    subset: SubsetModel | None,
    device: torch.device,
) -> list[ExpertSlice]:
    """One slice per selected layer and fused tensor, its master a fp32 copy of the rows on ``device``.

    ``model`` is the transformers model (``subset.model`` in subset residency, where ``selection``
    defaults to all resident experts); ``selection`` uses ORIGINAL expert ids either way.

    Raises:
        ConfigError: full residency without a selection, or a selection that does not fit the model.
    """
    layers = {layer.index: layer for layer in moe_layers(model)}
    if subset is not None:
        chosen = check_selection(
            selection if selection is not None else subset.selection, subset.full_num_experts
        )
        slots = {layer: tuple(subset.slot_of(layer, e) for e in ids) for layer, ids in chosen.items()}
    else:
        if selection is None:
            raise ConfigError("full residency needs a selection", field="selection")
        chosen = check_selection(selection, {i: layer.num_experts for i, layer in layers.items()})
        slots = chosen
    slices = []
    for layer_index in sorted(chosen):
        layer: MoELayer = layers[layer_index]
        for tensor in FUSED_TENSORS:
            fused = getattr(layer.experts, tensor)
            index = torch.tensor(slots[layer_index], device=fused.device)
            rows = fused.detach().index_select(0, index)
            master = nn.Parameter(rows.to(device=device, dtype=torch.float32))
            slices.append(
                ExpertSlice(
                    layer=layer_index,
                    tensor=tensor,
                    experts=layer.experts,
                    slots=slots[layer_index],
                    expert_ids=chosen[layer_index],
                    master=master,
                    layer_view=layer,
                )
            )
    return slices


def splice(slices: list[ExpertSlice]) -> None:
    """Parametrize each slice's fused tensor so that its rows' gradient reaches the master."""
    for item in slices:
        parametrize.register_parametrization(
            item.experts, item.tensor, _Splice(item.row_index(), item.master)
        )


def write_masters(slices: list[ExpertSlice]) -> None:
    """Write each master, in the model dtype, into its rows of the fused tensor (or its shard)."""
    for item in slices:
        write_rows_(item.fused, item.row_index(), item.master.detach())


def unsplice(slices: list[ExpertSlice]) -> None:
    """Remove the parametrizations: the fused tensors are plain parameters again, rows as they are."""
    for item in slices:
        parametrize.remove_parametrizations(item.experts, item.tensor, leave_parametrized=False)


def trained_experts(slices: list[ExpertSlice]) -> dict[str, torch.Tensor]:
    """Each expert from its masters cast to the model dtype: the bits its fused rows hold."""
    state: dict[str, torch.Tensor] = {}
    for item in slices:
        rows = item.master.detach().to(item.fused.dtype)  # (n, 2*I, H) or (n, H, I), or transposed
        layer = item.layer_view
        for row, expert in zip(rows, item.expert_ids, strict=True):
            if item.tensor == "down_proj":
                state[layer.key(expert, "down_proj")] = down_linear(layer, row).clone(
                    memory_format=torch.contiguous_format
                )
            else:  # the family's fused layout, split as connito.ml.moe reads it
                gate, up = split_gate_up(layer, row)
                state[layer.key(expert, "gate_proj")] = gate.clone(memory_format=torch.contiguous_format)
                state[layer.key(expert, "up_proj")] = up.clone(memory_format=torch.contiguous_format)
    return dict(sorted(state.items()))
