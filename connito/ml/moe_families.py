"""The MoE families connito supports, what differs between them, and why the others are refused.

transformers 5 gives every MoE family the same parts: a fused experts module (``gate_up_proj``,
``down_proj``), a router module that returns the routing decision, and optional shared experts.
The generic adapter in ``connito.ml.moe`` finds those parts by structure; this table holds only
what structure cannot tell: how the fused tensor is laid out, and the key ``save_pretrained``
writes for one expert (``conversion_mapping.py`` renames fused tensors back to per-expert keys on
save for most families; Mixtral, PhiMoE and MiniMax keep their original ``block_sparse_moe`` /
``w1 w3 w2`` names; gpt-oss, Llama 4 and Granite write the fused tensors as they are, so no
per-expert key exists on disk and connito names expert E's slice as
``<block>.experts.E.<projection>.weight`` of the module path).

Routing differences (softmax or sigmoid, top-k before or after normalisation, correction bias,
grouped top-k, shared-expert gates, clamped activations, expert biases) need no entry: connito runs
each family's own router and experts forward, and reads the router's output.

May import: nothing from connito.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Family", "FAMILIES", "REFUSED", "SUPPORTED_MODEL_TYPES", "family_of", "refusal_reason"]

# How one expert sits in the fused tensors:
#   gate_up:     gate_up_proj (E, 2*I, H) gate rows first, down_proj (E, H, I)   (most families)
#   transposed:  gate_up_proj (E, H, 2*I) gate columns first, down_proj (E, I, H) (Llama 4)
#   interleaved: gate_up_proj (E, H, 2*I) gate = even columns, up = odd, down_proj (E, I, H) (gpt-oss)
Layout = Literal["gate_up", "transposed", "interleaved"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """What the generic adapter needs to know about one ``model_type`` beyond its structure."""

    model_type: str
    layout: Layout = "gate_up"
    block: str = "mlp"  # the MoE block's attribute on a decoder layer
    disk_block: str | None = None  # block name in saved keys when it differs from the module path
    disk_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    disk_fused: bool = False  # save_pretrained writes the fused tensors, not one key per expert
    # load_subset_model reads this family's checkpoint names (others rename tensors on save that the
    # subset loader does not map back yet: their subset models are extracted from a loaded model)
    disk_subset: bool = True


_MIXTRAL_NAMES = ("w1", "w3", "w2")

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(model_type="qwen3_moe"),
        Family(model_type="qwen2_moe"),
        Family(model_type="olmoe"),
        Family(model_type="mixtral", disk_block="block_sparse_moe", disk_names=_MIXTRAL_NAMES),
        Family(model_type="deepseek_v2"),
        Family(model_type="deepseek_v3"),
        Family(model_type="gpt_oss", layout="interleaved", disk_fused=True),
        Family(model_type="llama4_text", layout="transposed", block="feed_forward", disk_fused=True),
        Family(model_type="qwen3_next"),
        Family(model_type="qwen3_5_moe_text"),
        Family(model_type="glm4_moe"),
        Family(model_type="granitemoe", block="block_sparse_moe", disk_fused=True, disk_subset=False),
        Family(model_type="granitemoeshared", block="block_sparse_moe", disk_fused=True, disk_subset=False),
        Family(
            model_type="phimoe", disk_block="block_sparse_moe", disk_names=_MIXTRAL_NAMES, disk_subset=False
        ),
        Family(model_type="minimax", disk_block="block_sparse_moe", disk_names=_MIXTRAL_NAMES),
        Family(model_type="dots1"),
        Family(model_type="ernie4_5_moe", disk_subset=False),
        Family(model_type="hunyuan_v1_moe"),
        Family(model_type="flex_olmo"),
        Family(model_type="lfm2_moe", block="feed_forward", disk_names=_MIXTRAL_NAMES, disk_subset=False),
        Family(model_type="afmoe"),
        Family(model_type="cohere2_moe"),
        Family(model_type="exaone_moe", disk_subset=False),
        Family(model_type="granitemoe_swa", block="block_sparse_moe", disk_fused=True),
        Family(model_type="minimax_m2", disk_block="block_sparse_moe", disk_names=_MIXTRAL_NAMES),
        Family(model_type="solar_open"),
        Family(model_type="minicpm5_moe", disk_subset=False),
        Family(model_type="mellum"),
        Family(model_type="mimo_v2_flash", disk_subset=False),
        Family(model_type="laguna", disk_subset=False),
        Family(model_type="hy_v3", disk_subset=False),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)

# model_type -> why connito refuses it (one line each). Families transformers ships with routed
# experts that are not in FAMILIES and not here are refused as "not verified" by refusal_reason.
REFUSED: dict[str, str] = {
    "jetmoe": "experts are per-head attention experts (MoA) besides MLP experts; no fused MLP experts module",
    "nllb_moe": "encoder-decoder translation model, not a causal LM",
    "switch_transformers": "encoder-decoder model, not a causal LM",
    "qwen3_vl_moe": "vision-language model: load its text model type instead",
    "qwen3_omni_moe": "multimodal model: no causal-LM head over the MoE text model alone",
    "glm4v_moe": "vision-language model: load its text model type instead",
    "ernie4_5_vl_moe": "vision-language model with modality-split experts",
    "llama4": "vision-language wrapper: use model_type llama4_text (the text config)",
    "nemotron_h": "non-gated experts (up_proj and down_proj only) in a hybrid Mamba block, not the gate_up layout",
    "longcat_flash": "zero-computation experts: the router scores more slots than there are expert tensors",
    "zaya": "the router is an MLP, not one (E, H) logit weight a subset can slice",
    "jamba": "transformers' own causal-LM loss fails on a tiny config (cache without attention layers); not verified",
    "deepseek_v32": "no fused MoE block found at model.layers.L.mlp with a generic config; not verified",
    "glm_moe_dsa": "no fused MoE block found at model.layers.L.mlp with a generic config; not verified",
}


def family_of(model_type: str) -> Family | None:
    """The supported family of ``model_type``, or None."""
    return FAMILIES.get(model_type)


def refusal_reason(model_type: str) -> str:
    """One line saying why ``model_type`` is refused (the caller prefixes the model)."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    return "no MoE adapter verified for this family (supported: " + ", ".join(SUPPORTED_MODEL_TYPES) + ")"
