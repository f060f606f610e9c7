"""``connito plan``: what hardware a domain needs, from the base model's ``config.json`` alone.

The model is instantiated on the meta device (no weights exist, nothing is downloaded but
``config.json``, and the shipped real configs read a copy under ``configs/models/``). For each
residency it reports the selected experts' parameters and bytes, the payload a miner uploads
(fp32, bf16, int8), a miner's peak memory by term (``connito.ml.memory_plan``) with and without
gradient checkpointing, and what a validator spends per submission.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from connito.config import DomainConfig, load_domain_config
from connito.errors import ConfigError
from connito.ml.memory_plan import MemoryEstimate, ModelShape, estimate_memory, meta_model, model_shape
from connito.ml.model_config import check_model_config
from connito.ml.modeling import TORCH_DTYPES
from connito.ml.selection_record import load_selection

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_S", "DEFAULT_EVAL_TFLOPS", "ResidencyPlan", "Plan", "build_plan", "run_plan"]

BLOCK_S = 12  # Bittensor block time, seconds
DEFAULT_EVAL_TFLOPS = 200.0  # sustained validator throughput assumed: ~20% of an H100's bf16 peak
GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class ResidencyPlan:
    """One residency's figures, bytes unless named otherwise."""

    residency: str
    memory: MemoryEstimate
    fits: bool | None  # None: no --gpu-mem given


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The whole plan for one domain config (and selection)."""

    model: str
    model_type: str
    total_params: int
    active_params: int
    routed_params: int
    moe_layers: int
    experts_per_layer: int
    selected_experts: int
    selection_source: str
    selected_params: int
    selected_bytes: int  # in the model dtype
    payload_fp32_bytes: int
    payload_bf16_bytes: int
    payload_int8_bytes: int
    micro_batch: int
    sequence_length: int
    eval_tokens_per_submission: int
    eval_flops_per_submission: float
    eval_tflops: float
    evaluate_window_s: int
    submissions_per_evaluate_window: int
    gpu_mem_gib: float | None
    residencies: tuple[ResidencyPlan, ...]


def _selected_counts(
    config: DomainConfig, shape: ModelShape, selection: Path | None
) -> tuple[dict[int, int], str]:
    """{MoE layer: experts selected} from a selection JSON, else the config's per-layer maximum."""
    if selection is not None:
        record = load_selection(selection)
        counts = {entry.layer: len(entry.experts) for entry in record.layers}
        unknown = sorted(set(counts) - set(shape.num_experts))
        if unknown:
            raise ConfigError(
                f"layers {unknown} are not MoE layers of the model", path=str(selection), field="layers"
            )
        return counts, str(selection)
    cap = config.selection.max_experts_per_layer
    counts = {layer: min(cap or count, count) for layer, count in shape.num_experts.items()}
    return counts, f"selection.max_experts_per_layer={cap} in every MoE layer (worst case)"


def _int8_payload_bytes(shape: ModelShape, counts: dict[int, int]) -> int:
    """int8 rows plus one fp32 scale per row: gate and up have I rows, down has H."""
    rows = 2 * shape.intermediate_size + shape.hidden_size
    return sum((shape.expert_params[layer] + 4 * rows) * count for layer, count in counts.items())


def build_plan(
    config: DomainConfig,
    *,
    config_path: Path,
    selection: Path | None = None,
    gpu_mem_gib: float | None = None,
    eval_tflops: float = DEFAULT_EVAL_TFLOPS,
) -> Plan:
    """Every figure of ``connito plan`` for one domain config.

    Raises:
        ConfigError: the model's config.json cannot be read, or the selection does not fit the model.
        UnsupportedModelError: the family is refused.
    """
    hf_config = check_model_config(config.model, config_path=config_path)
    if hf_config is None:
        raise ConfigError(
            "plan needs model.id or model.inline (a library base has no config here)", field="model"
        )
    dtype_bytes = _DTYPE_BYTES[config.model.dtype]
    shape = model_shape(meta_model(hf_config, TORCH_DTYPES[config.model.dtype]))
    counts, source = _selected_counts(config, shape, selection)
    selected_params = sum(shape.expert_params[layer] * count for layer, count in counts.items())
    training, scoring, data = config.training, config.scoring, config.data
    sequence_length = data.sequence_length
    eval_tokens = (scoring.eval_batches + scoring.general_batches) * scoring.eval_batch_size * sequence_length
    eval_flops = 2.0 * shape.active_params() * eval_tokens  # a forward pass: 2 FLOPs per active parameter
    window_s = config.cycle.evaluate_blocks * BLOCK_S
    residencies = []
    for residency in ("full", "subset"):
        memory = estimate_memory(
            shape,
            counts,
            residency=residency,
            dtype_bytes=dtype_bytes,
            micro_batch=training.batch_size,
            sequence_length=sequence_length,
        )
        peak = memory.total_checkpointed if training.gradient_checkpointing else memory.total
        fits = None if gpu_mem_gib is None else peak <= gpu_mem_gib * GIB
        residencies.append(ResidencyPlan(residency=residency, memory=memory, fits=fits))
    return Plan(
        model=config.model.name,
        model_type=str(hf_config.model_type),
        total_params=shape.total_params,
        active_params=shape.active_params(),
        routed_params=shape.routed_params,
        moe_layers=len(shape.num_experts),
        experts_per_layer=max(shape.num_experts.values()),
        selected_experts=sum(counts.values()),
        selection_source=source,
        selected_params=selected_params,
        selected_bytes=selected_params * dtype_bytes,
        payload_fp32_bytes=selected_params * 4,
        payload_bf16_bytes=selected_params * 2,
        payload_int8_bytes=_int8_payload_bytes(shape, counts),
        micro_batch=training.batch_size,
        sequence_length=sequence_length,
        eval_tokens_per_submission=eval_tokens,
        eval_flops_per_submission=eval_flops,
        eval_tflops=eval_tflops,
        evaluate_window_s=window_s,
        submissions_per_evaluate_window=math.floor(window_s * eval_tflops * 1e12 / eval_flops),
        gpu_mem_gib=gpu_mem_gib,
        residencies=tuple(residencies),
    )


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: Plan, *, gradient_checkpointing: bool) -> list[str]:
    """The human-readable table, one line per figure."""
    lines = [
        f"model {plan.model} ({plan.model_type}): {plan.total_params / 1e9:.2f} B params, "
        f"{plan.active_params / 1e9:.2f} B active, {plan.moe_layers} MoE layers x {plan.experts_per_layer} experts",
        f"selected: {plan.selected_experts} experts = {plan.selected_params / 1e6:.1f} M params "
        f"({_gib(plan.selected_bytes).strip()} in the model dtype) from {plan.selection_source}",
        f"payload: fp32 {_gib(plan.payload_fp32_bytes).strip()}  bf16 {_gib(plan.payload_bf16_bytes).strip()}  "
        f"int8 {_gib(plan.payload_int8_bytes).strip()}",
        f"miner memory at micro-batch {plan.micro_batch} x {plan.sequence_length} tokens:",
        f"  {'term':<28}{'full':>14}{'subset':>14}",
    ]
    full, subset = (r.memory for r in plan.residencies)
    rows = [
        ("weights", full.weights, subset.weights),
        ("trainable (master+grad+adam)", full.trainable, subset.trainable),
        ("fused expert gradient", full.fused_gradient, subset.fused_gradient),
        ("activations", full.activations, subset.activations),
        ("activations (checkpointed)", full.activations_checkpointed, subset.activations_checkpointed),
        ("total", full.total, subset.total),
        ("total (checkpointed)", full.total_checkpointed, subset.total_checkpointed),
    ]
    lines += [f"  {name:<28}{_gib(a):>14}{_gib(b):>14}" for name, a, b in rows]
    if plan.gpu_mem_gib is not None:
        mode = "with" if gradient_checkpointing else "without"
        verdicts = "  ".join(
            f"{r.residency}: {'fits' if r.fits else 'does NOT fit'}" for r in plan.residencies
        )
        lines.append(
            f"GPU {plan.gpu_mem_gib:g} GiB ({mode} gradient checkpointing, as configured): {verdicts}"
        )
    lines.append(
        f"validator: {plan.eval_tokens_per_submission} tokens and {plan.eval_flops_per_submission / 1e12:.1f} TFLOP "
        f"per submission; {plan.submissions_per_evaluate_window} submissions per {plan.evaluate_window_s} s "
        f"evaluate window at {plan.eval_tflops:g} TFLOP/s sustained"
    )
    return lines


def run_plan(
    config_path: Path,
    *,
    selection: Path | None = None,
    gpu_mem_gib: float | None = None,
    as_json: bool = False,
    eval_tflops: float = DEFAULT_EVAL_TFLOPS,
) -> int:
    """``connito plan``: print the table (or one JSON object) for a domain config."""
    config = load_domain_config(config_path)
    plan = build_plan(
        config, config_path=config_path, selection=selection, gpu_mem_gib=gpu_mem_gib, eval_tflops=eval_tflops
    )
    if as_json:
        body = asdict(plan)
        for residency, entry in zip(plan.residencies, body["residencies"], strict=True):
            entry["memory"]["total"] = residency.memory.total
            entry["memory"]["total_checkpointed"] = residency.memory.total_checkpointed
        print(json.dumps(body, sort_keys=True))
        return 0
    for line in format_plan(plan, gradient_checkpointing=config.training.gradient_checkpointing):
        print(line)
    return 0
