"""The shipped domain configs: each parses, and the real-model ones are launchable as written.

No downloads: the real models' shapes are facts from their Hub ``config.json`` files, restated here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connito.config import DomainConfig, load_domain_config

DOMAINS = Path(__file__).resolve().parents[1] / "configs" / "domains"
YAMLS = sorted(DOMAINS.glob("*.yaml"))

# model id -> (MoE layers, hidden size, expert intermediate size), from each model's config.json
REAL_MODELS: dict[str, tuple[int, int, int]] = {
    "allenai/OLMoE-1B-7B-0924": (16, 2048, 1024),  # 16 layers, all MoE
    "deepseek-ai/DeepSeek-V2-Lite": (26, 2048, 1408),  # 27 layers, first_k_dense_replace = 1
    "Qwen/Qwen3-30B-A3B": (48, 2048, 768),  # 48 layers, all MoE
    "openai/gpt-oss-20b": (24, 2880, 2880),  # 24 layers, all MoE
}
BF16_BYTES = 2


def _real(configs: list[DomainConfig]) -> list[DomainConfig]:
    return [c for c in configs if c.model.id is not None]


@pytest.fixture(scope="module")
def configs() -> list[DomainConfig]:
    return [load_domain_config(path) for path in YAMLS]


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_domain_yaml_parses(path: Path) -> None:
    """load_domain_config accepts every shipped file (schema, bounds and cross-field rules)."""
    assert load_domain_config(path).name


def test_real_model_configs_ship_for_the_models_miners_have(configs) -> None:
    """The real MoE domains the operators run are present, in bf16, with distinct domain names."""
    assert {c.model.id for c in _real(configs)} >= set(REAL_MODELS)
    assert all(c.model.dtype == "bfloat16" for c in _real(configs))
    names = [c.name for c in configs]
    assert len(names) == len(set(names)), "domain names are bound into commitments: they must differ"


def test_real_model_configs_hold_out_a_split_miners_never_train_on(configs) -> None:
    """Each real domain names its held-out text explicitly, and it is not a split it trains on."""
    for config in _real(configs):
        data = config.data
        assert data.validation, f"{config.name}: data.validation must name the held-out split"
        trained = {(s.name, s.subset, s.split) for s in data.train}
        for held in data.validation:
            assert held.kind == "hub"
            assert (held.name, held.subset, held.split) not in trained, f"{config.name}: {held.split}"
        assert data.general, f"{config.name}: the forgetting guard needs general text"


def test_worst_case_payload_fits_the_download_cap(configs) -> None:
    """A selection at max_experts_per_layer in every layer still fits scoring.max_payload_bytes.

    Otherwise an honest miner's checkpoint would be rejected as too_large by every validator.
    """
    for config in _real(configs):
        layers, hidden, intermediate = REAL_MODELS[config.model.id]
        cap = config.selection.max_experts_per_layer
        assert cap is not None, f"{config.name}: bound the selection so the payload is bounded"
        worst_bytes = layers * cap * 3 * hidden * intermediate * BF16_BYTES
        assert worst_bytes <= config.scoring.max_payload_bytes, config.name
