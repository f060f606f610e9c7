"""Shared fixtures: tiny seeded MoE models of every supported family, built from configs offline."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.ml.moe import moe_layers
from connito.ml.selection_record import ExpertSelection, LayerSelection

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# model_type -> extra config: 8 routed experts, top-2 (DeepSeek-V3 grouped: 4 groups of 2).
TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, head_dim=8
    ),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        intermediate_size=64,
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        n_shared_experts=1,
        num_key_value_heads=4,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        n_shared_experts=1,
        num_key_value_heads=4,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
    ),
}
MODEL_TYPES = tuple(TINY_CONFIGS)  # the six families the rest of the suite runs on

# Every other supported family (connito.ml.moe_families): 8 routed experts, top-2, hybrid and
# grouped layouts as their real checkpoints have them (GLM-4.5 and dots1 grouped: 4 groups of 2).
TINY_CONFIGS.update(
    {
        "gpt_oss": dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=16,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "llama4_text": dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=16,
            intermediate_size_mlp=64,
            head_dim=8,
            interleave_moe_layer_step=1,
        ),
        "qwen3_next": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            intermediate_size=64,
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
        "qwen3_5_moe_text": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
        "glm4_moe": dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
        ),
        "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
        "granitemoeshared": dict(
            num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=32
        ),
        "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
        "minimax": dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=16,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            block_size=8,
        ),
        "dots1": dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            layer_types=["full_attention", "full_attention"],
        ),
        "ernie4_5_moe": dict(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
            moe_num_shared_experts=1,
            moe_layer_start_index=0,
            moe_layer_interval=1,
        ),
        "hunyuan_v1_moe": dict(
            num_experts=8,
            moe_topk=2,
            moe_intermediate_size=16,
            intermediate_size=16,
            head_dim=8,
            num_shared_expert=1,
        ),
        "flex_olmo": dict(
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=16,
            pad_token_id=1,
            bos_token_id=None,
            eos_token_id=2,
        ),
        "lfm2_moe": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            num_dense_layers=0,
            layer_types=["conv", "full_attention"],
        ),
        "afmoe": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
            num_dense_layers=0,
        ),
        "cohere2_moe": dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, head_dim=8
        ),
        "exaone_moe": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
            first_k_dense_replace=0,
        ),
        "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
        "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8),
        "solar_open": dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
        ),
        "minicpm5_moe": dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
        ),
        "mellum": dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
        ),
        "mimo_v2_flash": dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=64,
            head_dim=8,
        ),
        "laguna": dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, head_dim=8
        ),
        "hy_v3": dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, head_dim=8
        ),
    }
)
FAMILY_TYPES = tuple(TINY_CONFIGS)  # every supported family, for the per-family fidelity tests


def tiny_config(model_type: str, **overrides):
    """A transformers config for a 2-layer, 8-expert, hidden-32 model of ``model_type``."""
    values = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A seeded tiny model in eval mode; router weights randomised so routing is non-trivial."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for layer in moe_layers(model):  # some families zero-init routers: make routing non-uniform
            layer.router_weight.normal_(0.0, 0.5)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias", "router.bias")):
                tensor.uniform_(-0.1, 0.1)
    return model.eval()


def random_batch(batch_size: int = 2, seq_len: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=generator)


def make_selection(
    experts: Mapping[int, Sequence[int]],
    *,
    num_experts: int = 8,
    domain: str = "math",
    model_id: str = "inline:qwen3_moe",
    model_revision: str = "main",
    probe_tokens: int = 1000,
    score: float = 0.1,
) -> ExpertSelection:
    """A sealed token_ratio selection of ``experts`` ({layer: expert ids}), every expert scored alike."""
    return ExpertSelection(
        domain=domain,
        model_id=model_id,
        model_revision=model_revision,
        method="token_ratio",
        p=0.2,
        min_experts_per_layer=1,
        probe_tokens={domain: probe_tokens},
        layers=tuple(
            LayerSelection(layer=layer, experts=tuple(sorted(ids)), scores=(score,) * num_experts)
            for layer, ids in sorted(experts.items())
        ),
    ).sealed()


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param
