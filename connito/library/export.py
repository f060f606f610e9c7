"""Export a right-sized model for one domain: keep, per layer, the experts its tokens route to most.

The full model is the base with the domain's library version composed in. Routing is measured on
the domain's *training* text (never the held-out text the losses are then measured on), experts
are ranked per layer by how many tokens chose them, and the top ``ceil(keep_fraction * E)`` are
kept. The router keeps only their rows, the fused expert tensors only their slices, and the config
says ``num_experts = kept`` and ``num_experts_per_tok = min(k, kept)``: the folder is a standard
transformers checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads with no connito code.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from connito.config import DomainConfig
from connito.data import DomainData, build_domain_data
from connito.errors import LibraryError
from connito.fsutil import atomic_write
from connito.library.composition import compose
from connito.library.index import Library
from connito.library.model_card import card_for_version, write_model_card
from connito.library.records import LATEST, VersionRecord
from connito.ml.modeling import heldout_loss
from connito.ml.moe import RoutingStats, moe_layers
from connito.ml.selection import probe_routing
from connito.ml.subset import extract_subset

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FILE",
    "EXPORT_SEED",
    "ExportReport",
    "keep_count",
    "rank_experts",
    "prune_model",
    "expert_param_count",
    "export_domain",
]

EXPORT_FILE = "connito_export.json"
EXPORT_SEED = 20261123  # the localnet report's held-out sample seed: the numbers are comparable
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportReport:
    """What ``connito export`` wrote and how the pruned model compares with the full one."""

    version: str
    keep_fraction: float
    num_experts: int  # routed experts per layer in the full model
    kept_per_layer: int
    top_k: int  # num_experts_per_tok of the exported model
    kept: dict[int, list[int]]  # layer -> original expert ids kept
    params_full: int
    params_exported: int
    expert_params_full: int
    expert_params_exported: int
    domain_loss_full: float
    domain_loss_exported: float  # measured on the folder reloaded with plain transformers
    general_loss_full: float | None
    general_loss_exported: float | None
    eval_tokens: int
    out: str

    @property
    def expert_param_fraction(self) -> float:
        return self.expert_params_exported / self.expert_params_full

    @property
    def param_fraction(self) -> float:
        return self.params_exported / self.params_full

    @property
    def domain_loss_change(self) -> float:
        """Relative change of the domain held-out loss, exported vs full (0.02 = 2% worse)."""
        return self.domain_loss_exported / self.domain_loss_full - 1.0

    def to_json(self) -> dict:
        body = asdict(self)
        body["kept"] = {str(k): v for k, v in self.kept.items()}
        body.update(
            expert_param_fraction=self.expert_param_fraction,
            param_fraction=self.param_fraction,
            domain_loss_change=self.domain_loss_change,
        )
        return body


def keep_count(num_experts: int, keep_fraction: float) -> int:
    """Experts kept per layer: at least ``keep_fraction`` of them, at least one.

    Raises:
        LibraryError: a fraction outside (0, 1].
    """
    if not 0 < keep_fraction <= 1:
        raise LibraryError(f"keep-fraction must be in (0, 1], got {keep_fraction}")
    return max(1, math.ceil(keep_fraction * num_experts - 1e-9))


def rank_experts(stats: RoutingStats) -> dict[int, list[int]]:
    """Per layer, expert ids from most to least used: token count, then gate mass, then lower id."""
    ranking = {}
    for layer, counts in stats.token_counts.items():
        gates = stats.gate_sums[layer]
        ranking[layer] = sorted(range(len(counts)), key=lambda e: (-float(counts[e]), -float(gates[e]), e))
    return ranking


def prune_model(model: PreTrainedModel, keep: dict[int, list[int]]) -> PreTrainedModel:
    """A standalone copy of ``model`` holding only ``keep``'s experts, with a matching config.

    Every MoE layer must keep the same number of experts (a transformers config has one count).

    Raises:
        LibraryError: uneven counts, or a DeepSeek-V3 layer left with one expert (its router takes
            a top-2 inside each group, which transformers cannot do over one expert).
    """
    counts = {len(ids) for ids in keep.values()}
    if len(counts) != 1:
        raise LibraryError(f"every layer must keep the same number of experts, got {sorted(counts)}")
    count = counts.pop()
    if model.config.model_type == "deepseek_v3" and count < 2:
        raise LibraryError("deepseek_v3 needs at least 2 experts kept per layer (grouped top-2 router)")
    pruned = extract_subset(model, keep).model
    config = pruned.config
    for name in _EXPERT_COUNT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, count)
    config.num_experts_per_tok = min(int(config.num_experts_per_tok), count)
    for name in ("n_group", "topk_group"):  # the original groups are gone with most of their experts
        if getattr(config, name, None) is not None:
            setattr(config, name, 1)
    if getattr(config, "topk_method", None) is not None:
        config.topk_method = "greedy"
    return pruned


def expert_param_count(model: torch.nn.Module) -> int:
    """Elements in the routed experts' fused tensors (what pruning removes)."""
    return sum(layer.gate_up_proj.numel() + layer.down_proj.numel() for layer in moe_layers(model))


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _probe_batches(data: DomainData, batch_size: int):
    blocks = data.train_blocks(0, 1)
    for start in range(0, len(blocks), batch_size):
        yield blocks[start : start + batch_size]


def export_domain(
    library: Library,
    domain: str,
    *,
    keep_fraction: float,
    out: Path,
    version: str | None = None,
    base_dir: Path | None = None,
    config: DomainConfig | None = None,
    cache_dir: Path | None = None,
    eval_batches: int = 16,
    eval_batch_size: int = 8,
    progress: bool = False,
) -> ExportReport:
    """Compose ``domain``'s version, prune it to ``keep_fraction`` of its experts, save and re-check it.

    The saved folder is reloaded with plain ``AutoModelForCausalLM.from_pretrained`` and its
    held-out loss is the one reported, so the number is what a user of the folder gets.

    Raises:
        LibraryError: an unknown version, a bad fraction, or a model that cannot be pruned.
    """
    name = f"{domain}@{version or LATEST}"
    composition = compose(library, [name], base_dir=base_dir)
    record = composition.lanes[0].record
    assert record is not None, "a single lane always resolves to a version"
    config = config or library.domain_config(record.config_digest)
    data = build_domain_data(config.data, cache_dir=cache_dir or library.root / "cache", model=config.model)
    model = composition.model
    stats = probe_routing(
        model,
        _probe_batches(data, config.selection.probe_batch_size),
        max_tokens=config.selection.probe_tokens,
        progress=progress,
    )
    layers = moe_layers(model)
    num_experts = layers[0].num_experts
    kept_per_layer = keep_count(num_experts, keep_fraction)
    keep = {layer: sorted(ids[:kept_per_layer]) for layer, ids in rank_experts(stats).items()}
    domain_batches = data.heldout_sample(EXPORT_SEED, eval_batches, eval_batch_size)
    general_batches = (
        data.general_sample(EXPORT_SEED, eval_batches, eval_batch_size) if len(data.general_blocks) else []
    )
    full_domain = heldout_loss(model, domain_batches)
    full_general = heldout_loss(model, general_batches) if general_batches else None
    pruned = prune_model(model, keep)
    _save(pruned, out, base_location=composition.base_location, data=data)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=next(model.parameters()).dtype).eval()
    report = ExportReport(
        version=record.name,
        keep_fraction=keep_fraction,
        num_experts=num_experts,
        kept_per_layer=kept_per_layer,
        top_k=int(reloaded.config.num_experts_per_tok),
        kept=keep,
        params_full=_param_count(model),
        params_exported=_param_count(reloaded),
        expert_params_full=expert_param_count(model),
        expert_params_exported=expert_param_count(reloaded),
        domain_loss_full=full_domain,
        domain_loss_exported=heldout_loss(reloaded, domain_batches),
        general_loss_full=full_general,
        general_loss_exported=heldout_loss(reloaded, general_batches) if general_batches else None,
        eval_tokens=sum(int(b.numel()) for b in domain_batches),
        out=str(out),
    )
    atomic_write(out / EXPORT_FILE, (json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n").encode())
    _write_card(library, record, report, base_location=composition.base_location)
    logger.info(
        "exported version=%s keep_fraction=%.3f expert_params=%.3f domain_loss=%.4f full=%.4f",
        record.name, keep_fraction, report.expert_param_fraction, report.domain_loss_exported, full_domain,
    )  # fmt: skip
    return report


def _write_card(library: Library, record: VersionRecord, report: ExportReport, *, base_location: str) -> None:
    """The export's README.md: the version's card plus what the export kept and measured."""
    card = card_for_version(
        record,
        base_dir=Path(base_location),
        owner_evals=library.evals(record.name),
        losses={
            "held-out domain loss, full version": report.domain_loss_full,
            "held-out domain loss, this export": report.domain_loss_exported,
            "held-out general loss, this export": report.general_loss_exported,
        },
        extra={
            "export": f"{report.kept_per_layer} of {report.num_experts} experts per layer kept "
            f"(keep_fraction {report.keep_fraction:g}), {report.params_exported} parameters",
        },
    )
    write_model_card(card, Path(report.out))


def _save(model: PreTrainedModel, out: Path, *, base_location: str, data: DomainData) -> None:
    """save_pretrained plus the tokenizer (the base folder's if it has one, else the domain's)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    base = Path(base_location)
    if (base / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    else:
        data.tokenizer.save_pretrained(out)
