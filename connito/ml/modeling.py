"""Build and load the base MoE model, and compute its held-out loss the one way connito scores.

The loss is plain token cross-entropy in eval mode: never ``outputs.loss`` with router logits on,
which adds the load-balancing term (transformers 5 Qwen/OLMoE/Mixtral do).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from connito.config import ModelConfig
from connito.errors import ConfigError
from connito.ml.moe import check_model_type

logger = logging.getLogger(__name__)

__all__ = [
    "TORCH_DTYPES",
    "build_model",
    "load_model",
    "token_loss",
    "heldout_loss",
    "batch_losses",
    "mean_batch_loss",
]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def build_model(model_cfg: ModelConfig) -> PreTrainedModel:
    """A freshly initialised model from an inline transformers config (seeded, offline).

    Raises:
        ConfigError: the inline config is rejected by transformers.
        UnsupportedModelError: its model_type has no MoE adapter.
    """
    if model_cfg.inline is None:
        raise ConfigError("build_model needs model.inline", field="model.inline")
    inline = dict(model_cfg.inline)
    check_model_type(str(inline.get("model_type")))
    try:
        hf_config = AutoConfig.for_model(**inline)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"transformers rejected the inline config: {exc}", field="model.inline") from None
    kwargs = {}
    if model_cfg.experts_implementation is not None:
        kwargs["experts_implementation"] = model_cfg.experts_implementation
    torch.manual_seed(model_cfg.init_seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[model_cfg.dtype], **kwargs)
    return model.eval()


def load_model(path_or_id: str | Path, model_cfg: ModelConfig) -> PreTrainedModel:
    """Load a pretrained MoE from a folder or the Hub (pinned revision, no remote code).

    Raises:
        ConfigError: the id is unknown, unreachable or gated, or the folder holds no model.
        UnsupportedModelError: the family is refused, read from ``config.json`` before any weights.
    """
    kwargs = {"dtype": TORCH_DTYPES[model_cfg.dtype], "trust_remote_code": False}
    if model_cfg.experts_implementation is not None:
        kwargs["experts_implementation"] = model_cfg.experts_implementation
    source: dict = {"trust_remote_code": False}
    if not Path(path_or_id).exists():
        source["revision"] = model_cfg.revision
    kwargs.update(source)
    try:
        hf_config = AutoConfig.from_pretrained(str(path_or_id), **source)  # the family, before any weights
    except (OSError, ValueError) as exc:  # unknown or unreachable id, gated repo: one line
        raise _unloadable(path_or_id, model_cfg, exc) from None
    check_model_type(hf_config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), config=hf_config, **kwargs)
    except (OSError, ValueError) as exc:  # no weights, a damaged shard: one line
        raise _unloadable(path_or_id, model_cfg, exc) from None
    return model.eval()


def _unloadable(path_or_id: str | Path, model_cfg: ModelConfig, exc: Exception) -> ConfigError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"cannot load model {path_or_id}@{model_cfg.revision}: {first_line}", field="model.id")


def token_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed next-token cross-entropy over one batch and the number of predicted tokens.

    Returns a sum, not a mean, so that batches are combined exactly: divide once at the end.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    loss_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(loss_sum), int((targets != -100).sum())


def heldout_loss(model: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean token cross-entropy of ``model`` over ``batches`` (eval mode, no grad).

    Returns ``nan`` or ``inf`` as computed: a caller that scores submissions must reject a
    non-finite loss on any batch, never drop that batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss_sum, n = token_loss(model, batch.to(device))
            total += loss_sum
            count += n
    model.train(was_training)
    return total / max(count, 1)


def batch_losses(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[float]:
    """Mean token cross-entropy of each batch (eval mode, no grad), in batch order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for batch in batches:
            loss_sum, count = token_loss(model, batch.to(device))
            losses.append(loss_sum / max(count, 1))
    model.train(was_training)
    return losses


def mean_batch_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """The mean of ``batch_losses``: the protocol's arithmetic (per-batch means, then their mean);
    ``nan`` for no batches."""
    losses = batch_losses(model, batches)
    return sum(losses) / len(losses) if losses else float("nan")
