"""How much a miner's GPU must hold, estimated from the model's shapes alone (a meta-device model).

The estimate is a sum of named terms, each tied to what the sparse trainer
(``connito.ml.training``, ``connito.ml.expert_slices``) actually allocates:

- weights: every resident parameter in the model dtype (full residency: the whole model; subset:
  everything but the unselected experts);
- trainable: 16 B per selected parameter: fp32 master (4), its fp32 gradient (4), AdamW's two fp32
  moments (8);
- fused gradient: backward through the fused experts materialises the gradient of a whole fused
  tensor (the largest is ``gate_up_proj``, 2/3 of a layer's experts) in the model dtype before the
  selected rows are taken out; one tensor at a time, so the peak holds one;
- activations: what autograd saves for backward per decoder layer (frozen linears save no input;
  norms, attention and activations do), plus the logits and their fp32 loss copies, or with
  gradient checkpointing each layer's input plus one layer recomputed.

``benchmarks/plan_memory.py`` measures the peak of a real training step against this estimate.

May import: connito.errors, connito.ml.moe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from connito.ml.moe import MoELayer, moe_layers

__all__ = ["TRAINABLE_BYTES_PER_PARAM", "ModelShape", "MemoryEstimate", "model_shape", "estimate_memory"]

TRAINABLE_BYTES_PER_PARAM = 16  # fp32 master + fp32 grad + AdamW exp_avg + exp_avg_sq
FP32_BYTES = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """The sizes the plan needs, read from a (meta-device) model."""

    total_params: int
    expert_params: dict[int, int]  # MoE layer -> params of ONE routed expert (3 * I * H)
    num_experts: dict[int, int]  # MoE layer -> routed experts
    top_k: dict[int, int]
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention_width: int  # q + k + v + attention output widths per token
    shared_width: int  # shared-expert intermediate width per token (0 if none)
    dense_width: int  # dense MLP intermediate width of non-MoE layers
    intermediate_size: int  # routed expert width I

    @property
    def routed_params(self) -> int:
        return sum(self.expert_params[layer] * self.num_experts[layer] for layer in self.expert_params)

    def active_params(self) -> int:
        """Parameters one token touches: everything but the routed experts it does not pick."""
        unpicked = sum(
            self.expert_params[layer] * (self.num_experts[layer] - self.top_k[layer])
            for layer in self.expert_params
        )
        return self.total_params - unpicked


def _attention_width(model: nn.Module) -> int:
    """q, k, v and output widths of the first attention block (0 for none found)."""
    for module in model.modules():
        names = dict(module.named_children())
        if {"q_proj", "o_proj"} <= names.keys() or {"q_a_proj", "o_proj"} <= names.keys():
            out = names["o_proj"]
            q_width = int(getattr(out, "in_features", 0))
            kv = names.get("k_proj") or names.get("kv_b_proj")
            kv_width = int(getattr(kv, "out_features", 0)) if kv is not None else q_width
            return 2 * q_width + 2 * kv_width
    return 0


def _shared_width(layer: MoELayer) -> int:
    widths = [int(m.out_features) for s in layer.shared for m in s.modules() if isinstance(m, nn.Linear)]
    return max([w for w in widths if w != layer.hidden_size] or [0])


def model_shape(model: nn.Module) -> ModelShape:
    """The plan's sizes of ``model`` (build it on the meta device: nothing is allocated)."""
    layers = moe_layers(model)
    config: Any = model.config  # a PreTrainedModel: its transformers config
    dense = [
        int(m.out_features)
        for name, m in model.named_modules()
        if name.endswith("mlp.gate_proj") and isinstance(m, nn.Linear)
    ]
    return ModelShape(
        total_params=sum(p.numel() for p in model.parameters()),
        expert_params={layer.index: 3 * layer.intermediate_size * layer.hidden_size for layer in layers},
        num_experts={layer.index: layer.num_experts for layer in layers},
        top_k={layer.index: layer.top_k for layer in layers},
        num_layers=int(config.num_hidden_layers),
        hidden_size=layers[0].hidden_size,
        vocab_size=int(config.vocab_size),
        attention_width=_attention_width(model),
        shared_width=_shared_width(layers[0]),
        dense_width=max(dense or [0]),
        intermediate_size=layers[0].intermediate_size,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """A miner's peak memory, by term, in bytes."""

    weights: int
    trainable: int
    fused_gradient: int
    activations: int
    activations_checkpointed: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.fused_gradient + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.weights + self.trainable + self.fused_gradient + self.activations_checkpointed


def _layer_activation_bytes(
    shape: ModelShape, tokens: int, dtype_bytes: int, *, moe: bool, top_k: int
) -> int:
    """What autograd keeps for one decoder layer's backward (frozen linears keep no input)."""
    hidden = shape.hidden_size
    norms = 2 * tokens * hidden  # two RMSNorm inputs
    attention = tokens * shape.attention_width  # q, k, v and the attention output (SDPA keeps them)
    residual = 2 * tokens * hidden
    if moe:
        inter = shape.intermediate_size
        # per routed (token, expert): its input, gate_up output, activation output, down output
        routed = tokens * top_k * (2 * hidden + 3 * inter)
        shared = tokens * (3 * shape.shared_width + hidden) if shape.shared_width else 0
        mlp = routed + shared
        router = tokens * max(shape.num_experts.values()) * FP32_BYTES // dtype_bytes
    else:
        mlp = tokens * (3 * shape.dense_width + hidden)
        router = 0
    return (norms + attention + residual + mlp + router) * dtype_bytes


def _logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """Logits in the model dtype, their fp32 copy for cross-entropy and its fp32 gradient."""
    return tokens * shape.vocab_size * (dtype_bytes + 2 * FP32_BYTES)


def estimate_memory(
    shape: ModelShape,
    selected: dict[int, int],
    *,
    residency: str,
    dtype_bytes: int,
    micro_batch: int,
    sequence_length: int,
) -> MemoryEstimate:
    """Peak memory of a training step for ``selected`` ({MoE layer: experts trained}) experts.

    The steady state from the second step on: AdamW's moments exist (they are allocated at the
    first step) while the next backward runs.
    """
    trainable_params = sum(shape.expert_params[layer] * count for layer, count in selected.items())
    resident = shape.total_params
    if residency == "subset":
        resident -= sum(
            shape.expert_params[layer] * (shape.num_experts[layer] - selected.get(layer, 0))
            for layer in shape.expert_params
        )
    resident_experts = {
        layer: (selected.get(layer, 0) if residency == "subset" else shape.num_experts[layer])
        for layer in shape.expert_params
    }
    # gate_up_proj (E, 2*I, H) is 2/3 of a layer's expert parameters (3 * I * H each)
    largest_fused = max(
        2 * shape.expert_params[layer] // 3 * count for layer, count in resident_experts.items()
    )
    tokens = micro_batch * sequence_length
    per_layer = []
    for index in range(shape.num_layers):
        moe = index in shape.expert_params
        top_k = min(shape.top_k.get(index, 0), resident_experts.get(index, 0)) if moe else 0
        per_layer.append(_layer_activation_bytes(shape, tokens, dtype_bytes, moe=moe, top_k=top_k))
    logits = _logits_bytes(shape, tokens, dtype_bytes)
    checkpointed = shape.num_layers * tokens * shape.hidden_size * dtype_bytes + max(per_layer) + logits
    return MemoryEstimate(
        weights=resident * dtype_bytes,
        trainable=TRAINABLE_BYTES_PER_PARAM * trainable_params,
        fused_gradient=largest_fused * dtype_bytes,
        activations=sum(per_layer) + logits,
        activations_checkpointed=checkpointed,
    )


def meta_model(hf_config: object, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: shapes without a byte of weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
