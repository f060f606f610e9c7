"""The model card of every published global and every export: what it is, where it came from.

A folder of expert tensors on the Hub says nothing about itself. Its card (the repo's
``README.md``, which the Hub renders and indexes) names the base model and revision and the base
model's license (an adaptation inherits it), the domain, the selection digest, the cycle, the
lineage (parent revision or version), the contributors with their merge weights, the held-out
losses, and the owner's downstream evaluations where there are any. Everything on it comes from
records that are already public (merge record, library version record, selection); the card
adds no claim of its own.

May import: connito.config, connito.ml.selection_record, connito.protocol, connito.library.records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from connito.config import DomainConfig
from connito.fsutil import atomic_write
from connito.library.records import VersionRecord
from connito.ml.selection_record import ExpertSelection
from connito.protocol.global_state import GlobalState

__all__ = [
    "MODEL_CARD_FILE",
    "UNKNOWN_LICENSE",
    "ModelCard",
    "base_model_license",
    "card_for_global",
    "card_for_version",
    "render_model_card",
    "write_model_card",
]

MODEL_CARD_FILE = "README.md"  # the Hub shows a repo's README.md as its model card
UNKNOWN_LICENSE = "other"  # the Hub's value for a license it cannot name; the card says why


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """The facts a card shows; ``render_model_card`` turns them into Markdown with Hub metadata."""

    title: str
    domain: str
    model_id: str
    model_revision: str
    license: str
    selection_digest: str
    cycle: int
    revision: str  # connito tensors digest of the experts the folder holds
    parent: str  # parent revision or library version ("base model" for the first)
    decision: str
    contributors: tuple[tuple[str, float], ...]  # (hotkey, merge weight)
    losses: dict[str, float | None] = field(default_factory=dict)  # held-out losses by name
    owner_evals: tuple[dict, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # e.g. an export's kept experts


def base_model_license(base_dir: Path | None) -> str:
    """The ``license`` of the base model's own card (its README.md metadata), else ``other``.

    Hub model repos declare their license in the YAML front matter of README.md; a local or
    inline model without one is reported as ``other`` and the card says the license is unknown.
    """
    readme = None if base_dir is None else Path(base_dir) / MODEL_CARD_FILE
    if readme is None or not readme.is_file():
        return UNKNOWN_LICENSE
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return UNKNOWN_LICENSE
    front, _, _ = text[3:].partition("\n---")
    try:
        metadata = yaml.safe_load(front) or {}
    except yaml.YAMLError:
        return UNKNOWN_LICENSE
    license_name = metadata.get("license") if isinstance(metadata, dict) else None
    return str(license_name) if isinstance(license_name, str) and license_name else UNKNOWN_LICENSE


def card_for_global(
    state: GlobalState,
    *,
    config: DomainConfig,
    selection: ExpertSelection,
    base_dir: Path | None,
    general_loss: float | None = None,
) -> ModelCard:
    """The card of a published global state, from its merge record."""
    record = state.record
    assert record is not None, "only a merged global is published"
    return ModelCard(
        title=f"connito {config.name} global, cycle {state.cycle}",
        domain=config.name,
        model_id=selection.model_id,
        model_revision=selection.model_revision,
        license=base_model_license(base_dir),
        selection_digest=selection.digest,
        cycle=state.cycle,
        revision=state.revision,
        parent=record.parent_revision,
        decision=record.decision,
        contributors=tuple((i.hotkey, i.weight) for i in record.inputs),
        losses={
            "held-out domain loss, previous global": record.global_domain_loss,
            "held-out domain loss, this global": record.result_domain_loss,
            "held-out general loss, this global": general_loss,
        },
        extra={"publisher": record.lead_hotkey, "eval seed": str(record.eval_seed)},
    )


def card_for_version(
    record: VersionRecord,
    *,
    base_dir: Path | None,
    owner_evals: list[dict],
    losses: dict[str, float | None] | None = None,
    extra: dict[str, str] | None = None,
) -> ModelCard:
    """The card of a library version (an export adds its own losses and kept experts)."""
    return ModelCard(
        title=f"connito {record.name}",
        domain=record.domain,
        model_id=record.model_id,
        model_revision=record.model_revision,
        license=base_model_license(base_dir),
        selection_digest=record.selection_digest,
        cycle=record.cycle,
        revision=record.tensors_sha256,
        parent=record.parent or f"base model ({record.parent_revision[:12]})",
        decision=record.decision,
        contributors=tuple((c.hotkey, c.weight) for c in record.contributors),
        losses={
            "held-out domain loss at publication": record.domain_loss,
            "held-out general loss at publication": record.general_loss,
            **(losses or {}),
        },
        owner_evals=tuple(owner_evals),
        extra={"publisher": record.lead_hotkey, **(extra or {})},
    )


def render_model_card(card: ModelCard) -> str:
    """Markdown with Hub metadata front matter (license, base_model, tags)."""
    metadata = {
        "license": card.license,
        "library_name": "transformers",
        "tags": ["connito", "mixture-of-experts", f"domain:{card.domain}"],
    }
    if "/" in card.model_id and not card.model_id.startswith(("inline:", "library:")):
        metadata["base_model"] = card.model_id
    license_line = (
        f"`{card.license}` (inherited from the base model)"
        if card.license != UNKNOWN_LICENSE
        else "unknown: the base model declares none; check it before any use"
    )
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=True).rstrip(),
        "---",
        "",
        f"# {card.title}",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{card.model_id}` at revision `{card.model_revision}` |",
        f"| license | {license_line} |",
        f"| domain | `{card.domain}` |",
        f"| selection digest | `{card.selection_digest}` |",
        f"| cycle | {card.cycle} |",
        f"| tensors digest | `{card.revision}` |",
        f"| lineage | merged into `{card.parent}` ({card.decision}) |",
        *(f"| {name} | `{value}` |" for name, value in card.extra.items()),
        "",
        "## Contributors",
        "",
        "| hotkey | merge weight |",
        "| --- | --- |",
        *(f"| `{hotkey}` | {weight:.4f} |" for hotkey, weight in card.contributors),
        "",
        "## Held-out losses",
        "",
        "| measurement | loss |",
        "| --- | --- |",
        *(f"| {name} | {'n/a' if loss is None else f'{loss:.4f}'} |" for name, loss in card.losses.items()),
        "",
    ]
    if card.owner_evals:
        lines += ["## Owner evaluations", ""]
        lines += [f"- `{json.dumps(result, sort_keys=True)}`" for result in card.owner_evals]
        lines.append("")
    return "\n".join(lines)


def write_model_card(card: ModelCard, folder: Path) -> Path:
    """Write the card as ``folder/README.md`` (atomically) and return its path."""
    path = Path(folder) / MODEL_CARD_FILE
    atomic_write(path, render_model_card(card).encode("utf-8"))
    return path
