"""Recording what every MoE router decides: the input of ESFT expert selection.

Hooks read each router's own output rather than recomputing top-k from logits, which would miss
DeepSeek-V3's correction bias and group limits, gpt-oss's router bias or PhiMoE's sparsemixer.
Routers return ``(logits, weights (T, k), indices (T, k))``, except Llama 4's, which returns
``(scores (T, E), logits)`` with zero scores for unchosen experts; both are read here.

May import: connito.errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from connito.ml.moe import MoELayer

__all__ = ["RoutingStats", "capture_routing", "routing_decision"]


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


def routing_decision(output: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (T, k), indices (T, k))`` from a router's output, whatever its family."""
    if len(output) == 2:  # Llama 4: dense (T, E) scores, sigmoid(-inf) = 0 off the top-k
        scores = output[0].reshape(-1, output[0].shape[-1])
        weights, indices = torch.topk(scores, top_k, dim=-1)
        return weights, indices
    _logits, weights, indices = output
    return weights.reshape(-1, weights.shape[-1]), indices.reshape(-1, indices.shape[-1])


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[_RoutingRecorder]:
    """Record what every router decides during forward passes inside the block.

    Call ``recorder.set_mask(attention_mask)`` before a forward to exclude padding positions.
    """
    from connito.ml.moe import moe_layers  # moe imports this module for its public names

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
        num_experts, top_k = layer.num_experts, layer.top_k

        def hook(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
            weights, indices = routing_decision(output, top_k)  # (T, k) each
            weights = weights.detach().to(torch.float64).cpu()
            indices = indices.detach().cpu()
            if self._mask is not None:
                keep = self._mask.cpu()
                weights, indices = weights[keep], indices[keep]
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
