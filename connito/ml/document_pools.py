"""Document expert pools (EMO): while pretraining, a sequence's tokens choose experts from one pool.

A standard MoE pretrained with load balancing spreads every domain over all of its experts, so a
model cut down to the experts a domain uses most breaks: on the localnet's base, keeping a quarter
of the experts raised the math held-out loss by 62%. EMO (Bhagia, Wang and Min, 2026) restricts the
tokens of each document to a pool of experts that the router prefers for the document as a whole,
draws the pool size at random per document, and keeps load balancing over the whole batch: experts
then group by domain and a quarter of them serves a domain almost as well as all of them.

The localnet's mixture packs each row from one source (``mixture_batches``), so a row stands in for
a document. The pool is the row's ``size`` experts with the highest mean router probability; each
token's top-k is then taken inside the pool (a pool smaller than k gives the remaining picks zero
weight, so pool size 1 trains top-1 routing). Pools change training only: the saved model is a
plain transformers checkpoint whose router sees every expert.

Miners can keep training inside pools (``training.document_pools``, ``SparseTrainer``). Trained in
the full model's routing alone, a selected expert learns to complement whichever partner each
token picks among all experts, and the gain leaves with the partners an export drops (tiny-math: a
quarter-of-experts export went from 0.5% below the full model to 6.6% above it in three cycles).
In pools, a math sequence's pool of two is the pair such an export keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn

from connito.errors import UnsupportedModelError
from connito.ml.moe import MoELayer, moe_layers

__all__ = ["DocumentPools", "pool_mask"]

# routers computing softmax(x W^T) then top-k, returning (logits, top-k weights, top-k indices)
_SOFTMAX_TOPK_ROUTERS = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")


class DocumentPools:
    """Installs pooled routing on every MoE layer of ``model`` inside a ``with`` block.

    Call ``draw(rows)`` before each forward: it picks each row's pool size from ``sizes`` with the
    generator seeded by ``seed``, so a pretraining run is reproducible.

    Raises:
        UnsupportedModelError: a router that is not a plain softmax top-k (DeepSeek's grouped,
            biased routers).
        ValueError: a pool size outside [1, num_experts], or no sizes.
    """

    def __init__(self, model: nn.Module, sizes: Sequence[int], *, seed: int) -> None:
        model_type = str(getattr(model.config, "model_type", ""))
        if model_type not in _SOFTMAX_TOPK_ROUTERS:
            raise UnsupportedModelError(
                f"model_type={model_type}: document pools need a softmax top-k router "
                f"({', '.join(_SOFTMAX_TOPK_ROUTERS)})"
            )
        self.layers = moe_layers(model)
        num_experts = self.layers[0].num_experts
        if not sizes or any(not 1 <= size <= num_experts for size in sizes):
            raise ValueError(f"pool sizes must be in [1, {num_experts}], got {list(sizes)}")
        self.sizes = torch.tensor(sorted(set(sizes)), dtype=torch.long)
        self._generator = torch.Generator().manual_seed(seed)
        self._row_sizes: torch.Tensor | None = None

    def draw(self, rows: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pick the pool size of each of the next forward's ``rows`` rows; returns them.

        ``generator`` replaces the pools' own seeded one for this draw (a trainer derives one from
        its step so that a resumed run draws the same sizes).
        """
        picks = torch.randint(len(self.sizes), (rows,), generator=generator or self._generator)
        self._row_sizes = self.sizes[picks]
        return self._row_sizes

    def __enter__(self) -> DocumentPools:
        for layer in self.layers:
            layer.router.forward = self._pooled_forward(layer)  # instance attribute shadows the class's
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for layer in self.layers:
            vars(layer.router).pop("forward", None)

    def _pooled_forward(self, layer: MoELayer) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        router = layer.router
        normalise = bool(getattr(router, "norm_topk_prob", True))  # Mixtral always renormalises

        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if self._row_sizes is None:
                raise RuntimeError("DocumentPools.draw(rows) must be called before each forward")
            hidden = hidden_states.reshape(-1, layer.router_weight.shape[1])
            logits = F.linear(hidden, layer.router_weight)  # (rows * T, E)
            rows, experts = len(self._row_sizes), logits.shape[-1]
            mask = pool_mask(logits.detach().view(rows, -1, experts), self._row_sizes.to(logits.device))
            # masked logits go to the load-balancing loss too: balance is over what tokens could pick
            pooled = logits.masked_fill(
                ~mask.repeat_interleave(logits.shape[0] // rows, dim=0), torch.finfo(logits.dtype).min
            )
            probs = pooled.float().softmax(dim=-1)
            weights, indices = torch.topk(probs, layer.top_k, dim=-1)
            if normalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return pooled, weights.to(logits.dtype), indices

        return forward


def pool_mask(row_logits: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(rows, E)`` True on each row's ``sizes[row]`` experts of highest mean router probability."""
    preference = row_logits.float().softmax(dim=-1).mean(dim=1)  # (rows, E)
    rank = preference.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < sizes[:, None]
