"""ESFT expert selection: routing probe, per-layer scores, the threshold rule, the sealed record."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import MODEL_TYPES, random_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from connito.config import SelectionConfig
from connito.errors import ConfigError
from connito.ml.moe import RoutingStats, moe_layers
from connito.ml.selection import (
    SHARE_TOLERANCE,
    compute_differential_scores,
    compute_gate_scores,
    compute_token_ratios,
    probe_routing,
    rederive_selection,
    select_experts,
    select_layer,
)
from connito.ml.selection_record import load_selection, save_selection

FORCED_EXPERT = 3


def _batches(count: int = 3, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> list[torch.Tensor]:
    return [random_batch(batch_size, seq_len, seed=seed + i) for i in range(count)]


def _probe(model, seed: int = 0, max_tokens: int = 96) -> RoutingStats:
    return probe_routing(model, _batches(seed=seed), max_tokens=max_tokens, progress=False)


def _select(stats: RoutingStats, general: RoutingStats | None = None, **config):
    return select_experts(
        stats,
        config=SelectionConfig(**config),
        general_stats=general,
        domain="math",
        model_id="inline:tiny",
        model_revision="rev0",
        probe_tokens={"domain": 96, **({"general": 96} if general is not None else {})},
    )


def _stats(counts: dict[int, list[int]], *, top_k: int = 1) -> RoutingStats:
    """Hand-made routing stats: ``counts[layer][e]`` tokens chose e; gate sums mirror the counts."""
    stats = RoutingStats()
    for layer, row in counts.items():
        stats.token_counts[layer] = torch.tensor(row, dtype=torch.float64)
        stats.gate_sums[layer] = torch.tensor(row, dtype=torch.float64) * 0.3
        stats.tokens[layer] = int(sum(row)) // top_k
        stats.top_k[layer] = top_k
    return stats


def _force_expert(model, expert: int) -> None:
    """Make layer 0's router choose ``expert`` for every token.

    A linear router can only prefer one expert for *every* token if all router inputs share a
    direction, so give every token embedding a large constant in dimension 0 (it survives the
    RMSNorm in front of the router), then let the router row of ``expert`` read that dimension.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        router = moe_layers(model)[0].router
        router.weight[:, 0] = 0.0
        router.weight[expert, 0] = 20.0


# --- the probe --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_token_ratios_sum_to_one_per_layer(model_type):
    ratios = compute_token_ratios(_probe(tiny_model(model_type)))
    assert len(ratios) == len(moe_layers(tiny_model(model_type)))
    for layer, ratio in ratios.items():
        assert ratio.shape == (8,)
        assert (ratio >= 0).all(), layer
        assert ratio.sum().item() == pytest.approx(1.0, abs=1e-12), layer


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gate_scores_are_mean_gate_weights_not_rescaled(model_type):
    """ESFT-Gate: g_e = gate_sum_e / tokens; a layer sums to the mean routed mass per token."""
    stats = _probe(tiny_model(model_type))
    for layer, score in compute_gate_scores(stats).items():
        assert torch.equal(score, stats.gate_sums[layer] / stats.tokens[layer]), layer


def test_gate_scores_of_an_unrenormalised_router_sum_to_its_routed_mass():
    """DeepSeek-V2 routes ~0.3 of the mass per token: the scores keep that, as the paper's rule does."""
    stats = _stats({0: [10, 30, 60, 0]})
    assert stats.gate_sums[0].sum().item() == pytest.approx(30.0)
    assert compute_gate_scores(stats)[0].tolist() == pytest.approx([0.03, 0.09, 0.18, 0.0])


def test_gate_rule_with_p_01_picks_more_experts_than_the_rescaled_rule():
    """Mass 0.3 per token, p = 0.1: the paper's rule needs 0.1 of the whole token, not 0.1 of the 0.3 routed."""
    stats = _stats({0: [10, 30, 60, 0]})
    assert _select(stats, method="gate_score", p=0.1).experts_by_layer[0] == [2]
    stats = _stats({0: [20, 20, 20, 20, 20]})  # 100 tokens, 0.06 of gate weight each
    assert _select(stats, method="gate_score", p=0.1).experts_by_layer[0] == [0, 1]


def test_rederive_selection_accepts_the_record_and_names_a_tampered_layer():
    domain = _stats({0: [50, 10, 25, 15]})
    general = _stats({0: [60, 20, 5, 15]})
    selection = _select(domain, general, method="differential", p=0.3)
    assert rederive_selection(selection) == []
    tampered = selection.model_copy(
        update={"layers": (selection.layers[0].model_copy(update={"experts": (0,)}),)}
    )
    assert rederive_selection(tampered) == ["layer 0: experts [0], the rule gives [2, 3]"]


def test_probe_counts_exactly_max_tokens_and_pulls_no_extra_batch():
    """An endless batch stream stops at the budget; the last batch is trimmed to it."""
    pulled = []

    def stream():
        for i in itertools.count():
            pulled.append(i)
            yield random_batch(2, 16, seed=i)

    stats = probe_routing(tiny_model("qwen3_moe"), stream(), max_tokens=40, progress=False)
    assert set(stats.tokens.values()) == {40}
    assert pulled == [0, 1]
    for layer, counts in stats.token_counts.items():
        assert counts.sum().item() == 40 * stats.top_k[layer]


def test_probe_does_not_count_padding():
    batch = random_batch(2, 16)
    mask = torch.ones_like(batch)
    mask[0, 12:] = 0
    stats = probe_routing(
        tiny_model("olmoe"), [{"input_ids": batch, "attention_mask": mask}], max_tokens=1000, progress=False
    )
    assert set(stats.tokens.values()) == {28}


def test_probe_restores_training_mode_and_removes_hooks():
    model = tiny_model("mixtral").train()
    probe_routing(model, _batches(1), max_tokens=32, progress=False)
    assert model.training
    assert all(not layer.router._forward_hooks for layer in moe_layers(model))


def test_probe_without_real_tokens_is_rejected():
    batch = random_batch(2, 16)
    with pytest.raises(ConfigError, match="no real token"):
        probe_routing(
            tiny_model("qwen3_moe"),
            [{"input_ids": batch, "attention_mask": torch.zeros_like(batch)}],
            max_tokens=64,
            progress=False,
        )


def test_probe_is_deterministic():
    first = _probe(tiny_model("deepseek_v3"))
    second = _probe(tiny_model("deepseek_v3"))
    for layer in first.token_counts:
        assert torch.equal(first.token_counts[layer], second.token_counts[layer])
        assert torch.equal(first.gate_sums[layer], second.gate_sums[layer])


# --- select_layer: the threshold rule ---------------------------------------------------------

_counts = st.lists(st.integers(0, 1000), min_size=1, max_size=16).filter(lambda xs: sum(xs) > 0)
_p = st.floats(0.01, 1.0)


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts]


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


@st.composite
def _bounds(draw):
    low = draw(st.integers(1, 20))
    high = draw(st.one_of(st.none(), st.integers(low, 24)))
    return low, high


@given(counts=_counts, p=_p, bounds=_bounds())
def test_select_layer_count_is_within_bounds(counts, p, bounds):
    low, high = bounds
    chosen = select_layer(_shares(counts), p=p, min_experts=low, max_experts=high)
    cap = len(counts) if high is None else min(high, len(counts))
    assert min(low, len(counts)) <= len(chosen) <= cap
    assert chosen == sorted(set(chosen))


@given(counts=_counts, p=_p, bounds=_bounds())
def test_select_layer_share_reaches_p_unless_capped(counts, p, bounds):
    low, high = bounds
    scores = _shares(counts)
    chosen = select_layer(scores, p=p, min_experts=low, max_experts=high)
    if high is None or len(chosen) < high:
        assert sum(scores[e] for e in chosen) >= p - SHARE_TOLERANCE


@given(counts=_counts, p=_p, bounds=_bounds())
def test_select_layer_takes_the_smallest_prefix_of_the_ranking(counts, p, bounds):
    low, high = bounds
    scores = _shares(counts)
    chosen = select_layer(scores, p=p, min_experts=low, max_experts=high)
    ranking = _ranking(scores)
    assert sorted(ranking[: len(chosen)]) == chosen
    if len(chosen) > low:  # not padded up to the minimum: dropping the last would fall short of p
        assert sum(scores[e] for e in ranking[: len(chosen) - 1]) < p - SHARE_TOLERANCE


@given(counts=_counts, p=_p, data=st.data())
def test_select_layer_follows_a_relabelling_of_experts(counts, p, data):
    """Renaming the experts renames the selection (distinct scores, so no tie-break is involved)."""
    distinct = [c * 64 + i for i, c in enumerate(counts)]
    scores = _shares(distinct)
    perm = data.draw(st.permutations(range(len(scores))))  # new id of old expert e is perm[e]
    relabelled = [0.0] * len(scores)
    for old, new in enumerate(perm):
        relabelled[new] = scores[old]
    chosen = select_layer(scores, p=p, min_experts=1, max_experts=None)
    chosen_relabelled = select_layer(relabelled, p=p, min_experts=1, max_experts=None)
    assert chosen_relabelled == sorted(perm[e] for e in chosen)


def test_select_layer_breaks_ties_toward_lower_expert_id():
    assert select_layer([0.25, 0.25, 0.25, 0.25], p=0.5, min_experts=1, max_experts=None) == [0, 1]
    assert select_layer([0.1, 0.3, 0.3, 0.3], p=0.3, min_experts=1, max_experts=None) == [1]


def test_select_layer_includes_the_expert_that_crosses_p():
    assert select_layer([0.5, 0.3, 0.2], p=0.6, min_experts=1, max_experts=None) == [0, 1]
    assert select_layer([0.5, 0.3, 0.2], p=0.5, min_experts=1, max_experts=None) == [0]


def test_select_layer_clamps_to_min_and_max():
    scores = [0.05, 0.6, 0.15, 0.2]
    assert select_layer(scores, p=0.2, min_experts=3, max_experts=None) == [1, 2, 3]
    assert select_layer(scores, p=1.0, min_experts=1, max_experts=2) == [1, 3]
    assert select_layer(scores, p=0.2, min_experts=9, max_experts=None) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [dict(p=0.0), dict(p=1.5), dict(min_experts=0), dict(max_experts=0)])
def test_select_layer_rejects_bad_parameters(bad):
    kwargs = dict(p=0.2, min_experts=1, max_experts=None) | bad
    with pytest.raises(ConfigError):
        select_layer([0.5, 0.5], **kwargs)


def test_select_layer_rejects_non_finite_scores():
    with pytest.raises(ConfigError, match="finite"):
        select_layer([0.5, float("nan")], p=0.2, min_experts=1, max_experts=None)


# --- select_experts ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_router_forced_to_prefer_expert_3_selects_it(model_type):
    model = tiny_model(model_type)
    _force_expert(model, FORCED_EXPERT)
    stats = _probe(model)
    first = moe_layers(model)[0].index
    assert stats.token_counts[first][FORCED_EXPERT].item() == stats.tokens[first]  # chosen by every token
    selection = _select(stats, method="token_ratio")
    assert selection.experts_by_layer[first] == [FORCED_EXPERT]  # share 1/top_k = 0.5 >= p = 0.2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", ["token_ratio", "gate_score", "differential"])
def test_every_family_and_method_yields_a_consistent_sealed_selection(model_type, method):
    model = tiny_model(model_type)
    domain, general = _probe(model, seed=0), _probe(model, seed=100)
    selection = _select(domain, general if method == "differential" else None, method=method)
    assert selection.digest == selection.content_digest()
    assert [entry.layer for entry in selection.layers] == [layer.index for layer in moe_layers(model)]
    expected = {
        "token_ratio": compute_token_ratios(domain),
        "gate_score": compute_gate_scores(domain),
        "differential": compute_differential_scores(domain, general),
    }[method]
    for entry in selection.layers:
        assert entry.scores == pytest.approx(expected[entry.layer].tolist(), abs=0)
        rederived = select_layer(
            entry.scores, p=selection.p, min_experts=1, max_experts=None, mass=entry.mass
        )
        assert list(entry.experts) == rederived  # the record alone re-derives the choice, differential too


def test_differential_picks_the_expert_the_domain_uses_more_than_general_text():
    """Expert 0 is everyone's favourite; expert 2 is what the domain uses beyond general text."""
    domain = _stats({0: [50, 10, 30, 10]})
    general = _stats({0: [60, 20, 5, 15]})
    assert _select(domain, method="token_ratio", p=0.2).experts_by_layer[0] == [0]
    differential = _select(domain, general, method="differential", p=0.2)
    assert differential.experts_by_layer[0] == [2]
    assert differential.layers[0].scores == pytest.approx([-0.1, -0.1, 0.25, -0.05])


def test_differential_reaches_p_in_domain_share_not_in_differential_score():
    """Ranked by differential, summed by domain share: 0.3 of domain share needs experts 2 and 3."""
    domain = _stats({0: [50, 10, 25, 15]})
    general = _stats({0: [60, 20, 5, 15]})
    # differential: [-0.1, -0.1, 0.2, 0.0] -> rank 2, 3, 0, 1; domain shares 0.25 + 0.15 >= 0.3
    assert _select(domain, general, method="differential", p=0.3).experts_by_layer[0] == [2, 3]


def test_differential_without_general_probe_is_rejected():
    with pytest.raises(ConfigError, match="general"):
        _select(_stats({0: [1, 2, 3]}), method="differential")


def test_differential_rejects_probes_of_different_models():
    with pytest.raises(ConfigError, match="layers"):
        compute_differential_scores(_stats({0: [1, 2]}), _stats({1: [1, 2]}))


def test_selection_bounds_come_from_config():
    stats = _stats({0: [1, 1, 1, 1, 1, 1, 1, 93], 1: [25, 25, 25, 25, 0, 0, 0, 0]})
    selection = _select(stats, method="token_ratio", p=0.9, min_experts_per_layer=2, max_experts_per_layer=3)
    assert selection.experts_by_layer == {0: [0, 7], 1: [0, 1, 2]}
    assert selection.min_experts_per_layer == 2 and selection.max_experts_per_layer == 3


def test_method_default_p_follows_esft():
    stats = _stats({0: [10, 20, 70]})
    assert _select(stats, method="token_ratio").p == 0.2
    assert _select(stats, method="gate_score").p == 0.1


def test_selection_record_lists_its_provenance():
    stats = _stats({0: [10, 20, 70], 2: [30, 30, 40]})
    selection = _select(stats, method="gate_score", p=0.15)  # mean gate scores: 0.3 x counts / 100 tokens
    assert selection.model_id == "inline:tiny" and selection.model_revision == "rev0"
    assert selection.domain == "math" and selection.method == "gate_score" and selection.p == 0.15
    assert selection.probe_tokens == {"domain": 96}
    assert selection.experts_by_layer == {0: [2], 2: [0, 2]}  # tie 0 vs 1 -> 0
    assert selection.layers[0].scores == pytest.approx([0.03, 0.06, 0.21])


def test_probe_tokens_default_to_the_probed_counts():
    domain, general = _stats({0: [10, 20, 70]}), _stats({0: [40, 40, 20]})
    selection = select_experts(
        domain,
        config=SelectionConfig(method="differential"),
        general_stats=general,
        domain="math",
        model_id="m",
        model_revision="r",
    )
    assert selection.probe_tokens == {"domain": 100, "general": 100}


def test_selection_json_round_trip_keeps_the_digest(tmp_path):
    model = tiny_model("qwen2_moe")
    selection = _select(_probe(model), method="token_ratio")
    path = tmp_path / "selection.json"
    save_selection(selection, path)
    loaded = load_selection(path)
    assert loaded == selection
    assert loaded.digest == selection.digest == loaded.content_digest()
