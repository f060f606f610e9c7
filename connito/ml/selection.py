"""ESFT expert selection: probe a domain's routing, score every expert per layer, pick the few it uses.

Paper: Wang et al. 2024, "Let the Expert Stick to His Last" (ESFT), section 3. Every score is
normalised per layer over the probed tokens, as in the paper's equations; the released script's
``np.sum(..., axis=0)`` normalises across *layers* instead (deepseek-ai/ESFT issue #17) and is not
followed. Selection is a pure function of the scores, so anyone holding the recorded scores can
re-derive the selected experts; the result is sealed into an ``ExpertSelection`` whose digest every
manifest binds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from connito.config import SelectionConfig
from connito.errors import ConfigError
from connito.ml.moe import RoutingStats, capture_routing
from connito.ml.selection_record import ExpertSelection, LayerSelection

__all__ = [
    "Batch",
    "SHARE_TOLERANCE",
    "probe_routing",
    "compute_token_ratios",
    "compute_gate_scores",
    "compute_differential_scores",
    "select_layer",
    "select_experts",
    "selection_from_scores",
    "rederive_selection",
]

logger = logging.getLogger(__name__)

# A probe batch: token ids (B, T) with every position real, or a mapping with ``input_ids`` and an
# optional ``attention_mask`` (1 = real token) whose zero positions are not counted.
Batch = torch.Tensor | Mapping[str, torch.Tensor]

# Float slack when comparing a cumulative share with p: shares are float64 quotients of integer
# counts, so a prefix whose exact share equals p may sum to p - 1e-16; without slack it would pull
# in one more expert than the rule says.
SHARE_TOLERANCE = 1e-9


def _unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        input_ids, attention_mask = batch, None
    else:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    return input_ids, attention_mask


def _within_budget(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, remaining: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """Trim a batch to the first ``remaining`` real tokens (row-major); return the count mask too.

    Whole trailing rows past the budget are dropped; inside the last kept row the tail is masked out
    of the statistics, so the probe covers exactly ``min(max_tokens, available)`` tokens.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    flat = real.reshape(-1)
    keep = (flat & (torch.cumsum(flat.long(), dim=0) <= remaining)).reshape(real.shape)  # (B, T)
    kept = int(keep.sum())
    rows = keep.any(dim=1).nonzero()
    last_row = int(rows.max()) + 1 if rows.numel() else 0
    trimmed_mask = None if attention_mask is None else attention_mask[:last_row]
    return input_ids[:last_row], trimmed_mask, keep[:last_row], kept


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def probe_routing(
    model: nn.Module, batches: Iterable[Batch], *, max_tokens: int, progress: bool = True
) -> RoutingStats:
    """Forward ``batches`` until ``max_tokens`` real tokens were probed; return what the routers chose.

    Stops before pulling another batch once the budget is met (``batches`` may be endless) and
    counts exactly ``max_tokens`` tokens when the data suffices: the last batch is trimmed to the
    budget. Runs in eval mode without gradients and restores the model's mode afterwards. Only the
    last position's logits are computed (``logits_to_keep=1``): the LM head over a 150k vocabulary
    would otherwise dwarf the probe. Padding (``attention_mask == 0``) is never counted.

    Raises:
        ConfigError: ``max_tokens`` < 1, or ``batches`` held no real token at all.
    """
    if max_tokens < 1:
        raise ConfigError(f"must be >= 1, got {max_tokens}", field="selection.probe_tokens")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    probed = 0
    num_batches = 0
    bar = tqdm(total=max_tokens, unit="tok", desc="probe routing", disable=not progress)
    try:
        with capture_routing(model) as recorder, torch.no_grad():
            iterator = iter(batches)
            while probed < max_tokens:  # check before pulling: ``batches`` may be endless
                batch = next(iterator, None)
                if batch is None:
                    break
                input_ids, attention_mask = _unpack(batch)
                input_ids, attention_mask, keep, kept = _within_budget(
                    input_ids, attention_mask, max_tokens - probed
                )
                if kept == 0:
                    continue
                recorder.set_mask(keep)
                model(
                    input_ids=input_ids.to(device),
                    attention_mask=None if attention_mask is None else attention_mask.to(device),
                    use_cache=False,
                    logits_to_keep=1,
                )
                probed += kept
                num_batches += 1
                bar.update(kept)
                logger.debug("probe batch=%d tokens=%d total=%d", num_batches, kept, probed)
    finally:
        bar.close()
        model.train(was_training)
    if probed == 0:
        raise ConfigError("probe batches held no real token", field="selection.probe_tokens")
    if probed < max_tokens:
        logger.warning("probe data exhausted tokens=%d max_tokens=%d", probed, max_tokens)
    logger.info("probe routing done tokens=%d batches=%d", probed, num_batches)
    return recorder.stats


def _tokens(stats: RoutingStats, layer: int) -> int:
    tokens = stats.tokens[layer]
    if tokens <= 0:
        raise ConfigError(
            f"layer {layer}: no probed tokens, cannot score experts", field="selection.probe_tokens"
        )
    return tokens


def compute_token_ratios(stats: RoutingStats) -> dict[int, torch.Tensor]:
    """ESFT-Token: r_e = count_e / (tokens * top_k), per layer; each layer's ratios sum to 1.

    The paper averages per sample first (1/N_s sum_j 1/L_j ...); pooling all tokens equals that for
    packed equal-length probe sequences and weighs ragged samples by their length otherwise.

    Raises:
        ConfigError: a layer saw no tokens.
    """
    return {
        layer: counts / (_tokens(stats, layer) * stats.top_k[layer])  # (E,)
        for layer, counts in stats.token_counts.items()
    }


def compute_gate_scores(stats: RoutingStats) -> dict[int, torch.Tensor]:
    """ESFT-Gate: g_e = gate_sum_e / tokens, the routing weight expert e gets, averaged over tokens.

    Not rescaled (paper section 3, p = 0.1): a layer's mean gate scores sum to the mean routed mass
    per token, 1 for routers that renormalise their top-k weights (Mixtral, Qwen3-MoE with
    ``norm_topk_prob``) but 0.26-0.53 on DeepSeek-V2-Lite, which does not, so there the rule picks
    the experts that carry p of the *whole* token (more experts than rescaling to 1 would).

    Raises:
        ConfigError: a layer saw no tokens or a non-finite gate sum.
    """
    scores: dict[int, torch.Tensor] = {}
    for layer, gate_sum in stats.gate_sums.items():
        total = float(gate_sum.sum())
        if not math.isfinite(total):
            raise ConfigError(f"layer {layer}: gate mass must be finite, got {total}", field="selection")
        scores[layer] = gate_sum / _tokens(stats, layer)  # (E,)
    return scores


def compute_differential_scores(domain: RoutingStats, general: RoutingStats) -> dict[int, torch.Tensor]:
    """Domain token share minus general token share, per layer: d_e = r_e(domain) - r_e(general).

    Positive where the domain leans on an expert more than general text does; the scores of a layer
    sum to 0 and may be negative. An expert every text uses (a "generalist") scores near 0, so the
    experts ranked first are the domain's specialists.

    Raises:
        ConfigError: the two probes saw different MoE layers or expert counts, or a layer saw no tokens.
    """
    if set(domain.token_counts) != set(general.token_counts):
        raise ConfigError(
            f"domain probe layers {sorted(domain.token_counts)} != general probe layers "
            f"{sorted(general.token_counts)}",
            field="data.general",
        )
    domain_ratio, general_ratio = compute_token_ratios(domain), compute_token_ratios(general)
    scores: dict[int, torch.Tensor] = {}
    for layer, ratio in domain_ratio.items():
        if ratio.shape != general_ratio[layer].shape:
            raise ConfigError(
                f"layer {layer}: domain probe has {ratio.numel()} experts, general probe "
                f"{general_ratio[layer].numel()}",
                field="data.general",
            )
        scores[layer] = ratio - general_ratio[layer]  # (E,)
    return scores


def _as_floats(values: Sequence[float] | torch.Tensor, name: str) -> list[float]:
    floats = values.detach().double().cpu().tolist() if isinstance(values, torch.Tensor) else list(values)
    floats = [float(v) for v in floats]
    if not all(math.isfinite(v) for v in floats):
        raise ConfigError(f"{name} must be finite, got {floats}", field="selection")
    return floats


def select_layer(
    scores: Sequence[float] | torch.Tensor,
    *,
    p: float,
    min_experts: int,
    max_experts: int | None,
    mass: Sequence[float] | torch.Tensor | None = None,
) -> list[int]:
    """The ESFT threshold rule for one layer; returns the selected expert ids, ascending.

    Rank experts by ``scores`` descending (ties go to the lower expert id), take the smallest
    prefix whose cumulative ``mass`` reaches ``p`` (the expert that crosses p is included; if the
    whole layer falls short, all experts), then clamp the count to ``[min_experts, max_experts]``
    and to the number of experts, keeping it a prefix of the ranking. ``mass`` defaults to
    ``scores``; the differential method ranks by the differential score but measures the domain's
    token share, so p keeps its ESFT-Token meaning. Sums reach p within ``SHARE_TOLERANCE``.

    Raises:
        ConfigError: p outside (0, 1], bad bounds, non-finite scores, or ``mass`` of another length.
    """
    if not 0 < p <= 1:
        raise ConfigError(f"must be in (0, 1], got {p}", field="selection.p")
    if min_experts < 1 or (max_experts is not None and max_experts < min_experts):
        raise ConfigError(
            f"need 1 <= min_experts <= max_experts, got min={min_experts} max={max_experts}",
            field="selection.min_experts_per_layer",
        )
    ranking_scores = _as_floats(scores, "scores")
    shares = ranking_scores if mass is None else _as_floats(mass, "mass")
    if len(shares) != len(ranking_scores):
        raise ConfigError(f"mass has {len(shares)} entries, scores {len(ranking_scores)}", field="selection")
    num_experts = len(ranking_scores)
    order = sorted(range(num_experts), key=lambda e: (-ranking_scores[e], e))
    count, cumulative = num_experts, 0.0
    for rank, expert in enumerate(order):
        cumulative += shares[expert]
        if cumulative >= p - SHARE_TOLERANCE:
            count = rank + 1
            break
    count = max(count, min_experts)
    if max_experts is not None:
        count = min(count, max_experts)
    return sorted(order[: min(count, num_experts)])


def _method_scores(
    method: str, domain_stats: RoutingStats, general_stats: RoutingStats | None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(ranking scores, cumulative mass) per layer for ``method``."""
    if method == "token_ratio":
        ratios = compute_token_ratios(domain_stats)
        return ratios, ratios
    if method == "gate_score":
        gates = compute_gate_scores(domain_stats)
        return gates, gates
    if general_stats is None:
        raise ConfigError(
            "method differential needs general_stats (a general-text probe)", field="data.general"
        )
    return compute_differential_scores(domain_stats, general_stats), compute_token_ratios(domain_stats)


def select_experts(
    domain_stats: RoutingStats,
    *,
    config: SelectionConfig,
    general_stats: RoutingStats | None = None,
    domain: str,
    model_id: str,
    model_revision: str,
    model_type: str | None = None,
    probe_tokens: dict[str, int] | None = None,
) -> ExpertSelection:
    """Score every expert of every MoE layer and pick each layer's experts by ``config``.

    ``config.method`` picks the score (``token_ratio``, ``gate_score`` or ``differential``, which
    needs ``general_stats``); ``config.threshold`` is p. The sealed record keeps every expert's
    ranking score (and, for differential, the domain token shares summed against p), so every
    choice can be re-derived from the record alone (``rederive_selection``). ``probe_tokens`` defaults
    to the token counts of the stats (``{"domain": N}`` plus ``"general": M`` when given).

    Raises:
        ConfigError: differential without ``general_stats``, mismatched probes, or no probed tokens.
    """
    ranking, mass = _method_scores(config.method, domain_stats, general_stats)
    return selection_from_scores(
        ranking,
        mass,
        config=config,
        domain=domain,
        model_id=model_id,
        model_revision=model_revision,
        model_type=model_type,
        probe_tokens=probe_tokens if probe_tokens is not None else _probe_tokens(domain_stats, general_stats),
    )


def _probe_tokens(domain_stats: RoutingStats, general_stats: RoutingStats | None) -> dict[str, int]:
    tokens = {"domain": max(domain_stats.tokens.values(), default=0)}
    if general_stats is not None:
        tokens["general"] = max(general_stats.tokens.values(), default=0)
    return tokens


def selection_from_scores(
    ranking: Mapping[int, torch.Tensor],
    mass: Mapping[int, torch.Tensor],
    *,
    config: SelectionConfig,
    domain: str,
    model_id: str,
    model_revision: str,
    model_type: str | None,
    probe_tokens: dict[str, int],
) -> ExpertSelection:
    """Apply ``config``'s rule to per-layer scores (probed here or read from a score file) and seal it.

    The record keeps the scores the rule was applied to and, where it differs (differential), the
    mass summed against p, so ``rederive_selection`` can check it from the record alone.
    """
    p = config.threshold
    layers: list[LayerSelection] = []
    for layer in sorted(ranking):
        experts = select_layer(
            ranking[layer],
            p=p,
            min_experts=config.min_experts_per_layer,
            max_experts=config.max_experts_per_layer,
            mass=mass[layer],
        )
        scores = tuple(float(v) for v in ranking[layer].tolist())
        shares = None if mass[layer] is ranking[layer] else tuple(float(v) for v in mass[layer].tolist())
        layers.append(LayerSelection(layer=layer, experts=tuple(experts), scores=scores, mass=shares))
        logger.debug("selection layer=%d experts=%s", layer, experts)
    selection = ExpertSelection(
        domain=domain,
        model_id=model_id,
        model_revision=model_revision,
        model_type=model_type,
        method=config.method,
        p=p,
        min_experts_per_layer=config.min_experts_per_layer,
        max_experts_per_layer=config.max_experts_per_layer,
        probe_tokens=dict(probe_tokens),
        layers=tuple(layers),
    ).sealed()
    logger.info(
        "selection domain=%s method=%s p=%s layers=%d experts=%d digest=%s",
        domain,
        config.method,
        p,
        len(layers),
        selection.num_selected,
        selection.digest[:12],
    )
    return selection


def rederive_selection(selection: ExpertSelection) -> list[str]:
    """Apply the record's own rule to its recorded scores; one line per layer whose choice differs.

    Empty when every layer's experts are what ``select_layer`` gives for the recorded scores (and,
    for a differential record, the recorded domain shares), p and bounds.
    """
    problems = []
    for entry in selection.layers:
        expected = select_layer(
            entry.scores,
            p=selection.p,
            min_experts=selection.min_experts_per_layer,
            max_experts=selection.max_experts_per_layer,
            mass=entry.mass,
        )
        if list(entry.experts) != expected:
            problems.append(f"layer {entry.layer}: experts {list(entry.experts)}, the rule gives {expected}")
    return problems
