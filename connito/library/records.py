"""What the expert library stores about one version, and how versions are named.

A version is one published global expert state of one domain: the selected experts' tensors
after a cycle's merge, with where they came from (base model, selection, parent version, the
miners merged and their weights, the merge record) and how good they are (held-out losses).

Names: ``<domain>@v<N>``, N = 1, 2, ... in the order the library recorded the domain's versions;
``<domain>@latest`` (or a bare ``<domain>``) is the newest version that has not been removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from connito.errors import LibraryError

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "LATEST",
    "VersionRef",
    "Contributor",
    "StoreLocation",
    "Removal",
    "VersionRecord",
    "VersionDraft",
    "parse_version",
    "version_name",
]

RECORD_SCHEMA_VERSION: Final = 1
LATEST = "latest"
_DOMAIN = r"[a-z0-9][a-z0-9_-]{0,31}"  # DomainConfig.name's pattern
_VERSION_RE = re.compile(
    rf"^(?P<domain>{_DOMAIN})(?:@(?:v(?P<number>[1-9][0-9]{{0,8}})|(?P<latest>latest)))?$"
)
_HEX64 = r"^[0-9a-f]{64}$"


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRef:
    """A parsed version name: a domain and a number, or None for ``latest``."""

    domain: str
    number: int | None

    def __str__(self) -> str:
        return (
            version_name(self.domain, self.number) if self.number is not None else f"{self.domain}@{LATEST}"
        )


def version_name(domain: str, number: int) -> str:
    """The canonical name of version ``number`` of ``domain``: ``math@v3``."""
    return f"{domain}@v{number}"


def parse_version(text: str) -> VersionRef:
    """Parse ``math@v3``, ``math@latest`` or ``math`` (= latest).

    Raises:
        LibraryError: anything else, naming the text and the accepted forms.
    """
    match = _VERSION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise LibraryError(f"version {text!r}: must be DOMAIN@vN, DOMAIN@latest or DOMAIN")
    number = match.group("number")
    return VersionRef(domain=match.group("domain"), number=int(number) if number else None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contributor(_Strict):
    """One miner submission that went into a version, with its merge weight."""

    hotkey: str = Field(max_length=64)
    uid: int = Field(ge=0)
    weight: float = Field(gt=0)
    tensors_sha256: str = Field(pattern=_HEX64)


class StoreLocation(_Strict):
    """Where the lead validator published the version (the chain commitment points here)."""

    kind: str = Field(max_length=16)
    repo: str = Field(max_length=200)
    revision: str = Field(max_length=64)


class Removal(_Strict):
    """An opt-out: the version is no longer served, but its history stays."""

    at: float = Field(description="unix time of the removal")
    reason: str = Field("", max_length=500)


class VersionRecord(_Strict):
    """One library version; everything ``connito library show`` prints."""

    schema_version: Literal[1] = RECORD_SCHEMA_VERSION
    name: str = Field(description="DOMAIN@vN")
    domain: str = Field(pattern=rf"^{_DOMAIN}$")
    number: int = Field(ge=1)
    model_id: str = Field(description="base model name (Hub id, inline:TYPE or library:VERSION)")
    model_revision: str = Field(description="exact revision of the base model")
    selection_digest: str = Field(pattern=_HEX64)
    config_digest: str = Field(
        pattern=_HEX64, description="digest of the domain YAML the version was trained under"
    )
    cycle: int = Field(ge=0)
    tensors_sha256: str = Field(pattern=_HEX64, description="connito tensors digest: the global revision")
    experts: tuple[str, ...] = Field(description="'L.E' of every expert the version holds")
    store: StoreLocation | None = None
    domain_loss: float | None = Field(None, description="mean held-out domain loss (see eval_seed)")
    general_loss: float | None = Field(None, description="mean held-out general loss (see eval_seed)")
    eval_seed: int | None = Field(None, ge=0, description="seed of the held-out sample the losses are on")
    parent: str | None = Field(None, description="the version it was merged into; None: the base model")
    parent_revision: str = Field(pattern=_HEX64, description="tensors digest of the parent state")
    decision: Literal["merged", "best_single"]
    contributors: tuple[Contributor, ...]
    merge_record_sha256: str = Field(pattern=_HEX64)
    lead_hotkey: str = Field(max_length=64)
    block: int | None = Field(None, ge=0, description="block of the global commitment on chain")
    recorded_at: float = Field(description="unix time the library first recorded it")
    removed: Removal | None = None

    @property
    def is_removed(self) -> bool:
        return self.removed is not None

    @property
    def experts_by_layer(self) -> dict[int, list[int]]:
        """``{layer: [expert, ...]}`` of the experts this version holds."""
        by_layer: dict[int, list[int]] = {}
        for item in self.experts:
            layer, expert = (int(x) for x in item.split("."))
            by_layer.setdefault(layer, []).append(expert)
        return {layer: sorted(experts) for layer, experts in sorted(by_layer.items())}


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionDraft:
    """A version as the recorder knows it; the library adds the number, the parent and the time."""

    domain: str
    model_id: str
    model_revision: str
    selection_digest: str
    config_digest: str
    cycle: int
    tensors_sha256: str
    store: StoreLocation | None
    domain_loss: float | None
    general_loss: float | None
    eval_seed: int | None
    parent_revision: str
    decision: str
    contributors: tuple[Contributor, ...]
    merge_record_sha256: str
    lead_hotkey: str
    block: int | None
