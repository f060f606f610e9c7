"""Compose library versions into one full model: the base model plus each lane's experts.

A lane is a domain's version (``math@latest``, ``code@v3``). Each lane contributes the experts it
*changed* relative to the base model; an expert two lanes changed is a conflict, resolved only by
an explicit precedence (never silently by lane order). A lane whose domain has no version left
(every one removed) contributes nothing, so its experts keep the base weights: that is opt-out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from connito.config import ModelConfig
from connito.errors import ConfigError, LibraryError
from connito.fsutil import atomic_write
from connito.library.index import Library
from connito.library.records import LATEST, VersionRecord, parse_version
from connito.ml.modeling import load_model
from connito.ml.moe import expert_key, read_experts, write_experts
from connito.ml.moe_families import Family, family_of

logger = logging.getLogger(__name__)

__all__ = [
    "COMPOSITION_FILE",
    "Lane",
    "Composition",
    "parse_lanes",
    "resolve_lanes",
    "load_version_base",
    "compose",
    "save_composition",
    "load_library_base",
    "library_base_revision",
]

COMPOSITION_FILE = "connito_composition.json"
PRETRAIN_MARKER = "connito_pretrain.json"  # written by connito.owner.bootstrap.pretrain_base


@dataclass(frozen=True, slots=True, kw_only=True)
class Lane:
    """A requested lane and the version it resolved to (None: the domain has no version left)."""

    request: str
    record: VersionRecord | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Composition:
    """A composed model and where each of its changed experts came from."""

    model: PreTrainedModel
    lanes: tuple[Lane, ...]
    owners: dict[str, str]  # "L.E" -> version name whose weights the expert holds
    base_location: str


def parse_lanes(text: str) -> list[str]:
    """``"math@latest, code@v3"`` -> ``["math@latest", "code@v3"]`` (each checked).

    Raises:
        LibraryError: an empty list or a malformed version name.
    """
    lanes = [part.strip() for part in text.split(",") if part.strip()]
    if not lanes:
        raise LibraryError(f"lanes {text!r}: give at least one DOMAIN@vN or DOMAIN@latest")
    for lane in lanes:
        parse_version(lane)
    return lanes


def resolve_lanes(library: Library, requests: list[str]) -> list[Lane]:
    """Resolve each lane to a version; ``latest`` skips removed versions, an explicit one must exist.

    Raises:
        LibraryError: two lanes of one domain, an unknown version, or an explicitly named removed one.
    """
    lanes: list[Lane] = []
    seen: dict[str, str] = {}
    for request in requests:
        ref = parse_version(request)
        if ref.domain in seen:
            raise LibraryError(f"lanes {seen[ref.domain]} and {request}: one lane per domain")
        seen[ref.domain] = request
        if ref.number is None:
            versions = [v for v in library.versions(ref.domain) if not v.is_removed]
            if not versions and any(library.versions(ref.domain)):
                logger.info("lane %s: every version removed; its experts keep the base weights", request)
                lanes.append(Lane(request=request, record=None))
                continue
            record = library.get(f"{ref.domain}@{LATEST}")
        else:
            record = library.get(request)
            if record.removed is not None:
                raise LibraryError(
                    f"lane {request}: {record.name} was removed ({record.removed.reason or 'no reason given'})"
                )
        lanes.append(Lane(request=request, record=record))
    return lanes


def load_version_base(
    library: Library, record: VersionRecord, *, base_dir: Path | None = None
) -> tuple[PreTrainedModel, str]:
    """The base model a version was trained on, and where it was loaded from.

    ``base_dir`` overrides the location the library remembers. A folder made by the localnet's
    pretraining carries its revision, which must match the version's.

    Raises:
        LibraryError: no known location, or a folder holding another revision.
    """
    location = (
        str(base_dir)
        if base_dir is not None
        else library.base_location(record.model_id, record.model_revision)
    )
    if location is None:
        raise LibraryError(
            f"{record.name}: library does not know where base {record.model_id}@{record.model_revision[:12]} is; pass --base DIR"
        )
    model_cfg = library.domain_config(record.config_digest).model
    folder = Path(location)
    if folder.is_dir():
        marker = folder / PRETRAIN_MARKER
        if marker.is_file():
            revision = json.loads(marker.read_text())["revision"]
            if revision != record.model_revision:
                raise LibraryError(
                    f"{record.name}: base folder {folder} holds revision {revision[:12]}, the version needs {record.model_revision[:12]}"
                )
        return load_model(folder, model_cfg), str(folder)
    hub_cfg = ModelConfig(
        id=location,
        revision=record.model_revision,
        dtype=model_cfg.dtype,
        experts_implementation=model_cfg.experts_implementation,
    )
    return load_model(location, hub_cfg), location


def _changed(
    record: VersionRecord,
    experts: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    family: Family | None,
) -> list[str]:
    """The 'L.E' experts whose tensors differ from the base model's."""
    changed = []
    for item in record.experts:
        layer, expert = (int(x) for x in item.split("."))
        keys = [expert_key(layer, expert, p, family=family) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(not torch.equal(experts[k], base[k]) for k in keys):
            changed.append(item)
    return changed


def _owners(
    changed: dict[str, list[str]], precedence: list[str], domain_of: dict[str, str]
) -> dict[str, str]:
    """'L.E' -> the lane (version name) that supplies it; conflicts need a precedence."""
    claims: dict[str, list[str]] = {}
    for name, items in changed.items():
        for item in items:
            claims.setdefault(item, []).append(name)
    owners: dict[str, str] = {}
    rank = {domain: i for i, domain in enumerate(precedence)}
    for item, names in sorted(claims.items()):
        if len(names) > 1:
            unranked = [n for n in names if domain_of[n] not in rank]
            if unranked:
                layer, expert = item.split(".")
                raise LibraryError(
                    f"lanes {' and '.join(names)} both changed layer {layer} expert {expert}; "
                    f"pass --precedence to choose (e.g. --precedence {','.join(domain_of[n] for n in names)})"
                )
            names = sorted(names, key=lambda n: rank[domain_of[n]])
        owners[item] = names[0]
    return owners


def compose(
    library: Library,
    requests: list[str],
    *,
    precedence: list[str] | None = None,
    base_dir: Path | None = None,
) -> Composition:
    """The base model with every lane's changed experts written in.

    Raises:
        LibraryError: lanes on different base models, unresolvable lanes, a conflict without a
            precedence, or a precedence naming a domain that is not a lane.
    """
    lanes = resolve_lanes(library, requests)
    records = [lane.record for lane in lanes if lane.record is not None]
    precedence = precedence or []
    domains = {parse_version(r).domain for r in requests}
    unknown = [d for d in precedence if d not in domains]
    if unknown:
        raise LibraryError(f"precedence {','.join(precedence)}: {unknown[0]} is not a lane domain")
    if not records:  # every lane opted out: the base model itself, found through a removed version
        records_any = [v for r in requests for v in library.versions(parse_version(r).domain)]
        model, location = load_version_base(library, records_any[-1], base_dir=base_dir)
        return Composition(model=model, lanes=tuple(lanes), owners={}, base_location=location)
    first = records[0]
    for other in records[1:]:
        if (other.model_id, other.model_revision) != (first.model_id, first.model_revision):
            raise LibraryError(
                f"lanes {first.name} and {other.name} are on different base models "
                f"({first.model_id}@{first.model_revision[:12]} vs {other.model_id}@{other.model_revision[:12]})"
            )
    model, location = load_version_base(library, first, base_dir=base_dir)
    states = {r.name: library.load_experts(r) for r in records}
    changed = {}
    family = family_of(str(model.config.model_type))  # library keys are the family's saved names
    for record in records:
        base = read_experts(model, record.experts_by_layer)
        changed[record.name] = _changed(record, states[record.name], base, family=family)
    owners = _owners(changed, precedence, {r.name: r.domain for r in records})
    for item, name in owners.items():
        layer, expert = (int(x) for x in item.split("."))
        keys = [expert_key(layer, expert, p, family=family) for p in ("gate_proj", "up_proj", "down_proj")]
        write_experts(model, {k: states[name][k] for k in keys})
    logger.info(
        "composed lanes=%s experts=%d base=%s", ",".join(r.name for r in records), len(owners), location
    )
    return Composition(model=model, lanes=tuple(lanes), owners=owners, base_location=location)


def save_composition(composition: Composition, out: Path) -> None:
    """Write the composed model as a standard transformers folder, with the base's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    composition.model.save_pretrained(out)
    base = Path(composition.base_location)
    if (base / "tokenizer.json").is_file() or (base / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    summary = {
        "lanes": {lane.request: lane.record.name if lane.record else None for lane in composition.lanes},
        "owners": composition.owners,
        "base": composition.base_location,
    }
    atomic_write(out / COMPOSITION_FILE, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def _library_version(spec: str) -> str:
    """``library:math@v3`` -> ``math@v3``."""
    return spec.removeprefix("library:")


def load_library_base(spec: str, library_root: Path | None) -> PreTrainedModel:
    """The model a domain YAML's ``model.base: library:VERSION`` names: the base with that version's experts.

    Raises:
        ConfigError: no library was given.
        LibraryError: the version is unknown, removed, or its base model cannot be found.
    """
    if library_root is None:
        raise ConfigError(f"model.base {spec} needs a library: pass --library PATH", field="model.base")
    return compose(Library(library_root), [_library_version(spec)]).model


def library_base_revision(spec: str, library_root: Path | None) -> str:
    """A pinned revision for a library base: ``math@v3:<tensors digest>``.

    Raises:
        ConfigError: no library was given.
        LibraryError: the version is unknown.
    """
    if library_root is None:
        raise ConfigError(f"model.base {spec} needs a library: pass --library PATH", field="model.base")
    record = Library(library_root).get(_library_version(spec))
    return f"{record.name}:{record.tensors_sha256}"
