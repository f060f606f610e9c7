"""The expert selection record: which experts of which layers a domain trains.

It is produced once by the subnet owner (``connito select``), shipped as JSON, and bound into
every manifest by its content digest, so a miner and a validator can never disagree on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connito.config import DomainConfig
from connito.errors import ConfigError
from connito.fsutil import atomic_write

__all__ = [
    "LayerSelection",
    "ExpertSelection",
    "LayerScores",
    "ScoreFile",
    "load_selection",
    "load_domain_selection",
    "load_score_file",
    "save_selection",
]

SELECTION_SCHEMA_VERSION: Final = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerSelection(_Strict):
    """The selected experts of one MoE layer and the score of every expert in it."""

    layer: int = Field(ge=0)
    experts: tuple[int, ...] = Field(min_length=1, description="selected expert ids, ascending")
    scores: tuple[float, ...] = Field(
        description="per-expert score the rule ranked by, index = expert id (token ratio, mean gate score, or differential)"
    )
    mass: tuple[float, ...] | None = Field(
        None,
        description="per-expert share summed against p when it is not the score (differential: domain token ratio)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LayerSelection:
        if list(self.experts) != sorted(set(self.experts)):
            raise ValueError(f"layer {self.layer}: experts must be unique and ascending")
        if any(e < 0 or e >= len(self.scores) for e in self.experts):
            raise ValueError(f"layer {self.layer}: expert id out of range 0..{len(self.scores) - 1}")
        if self.mass is not None and len(self.mass) != len(self.scores):
            raise ValueError(
                f"layer {self.layer}: mass has {len(self.mass)} entries, scores {len(self.scores)}"
            )
        return self


class ExpertSelection(_Strict):
    """A domain's expert selection; ``digest`` is sha256 over every other field."""

    schema_version: Literal[1] = SELECTION_SCHEMA_VERSION
    domain: str
    model_id: str
    model_revision: str
    model_type: str | None = Field(
        None,
        description="the base model's transformers model_type; expert keys follow its save_pretrained names",
    )
    method: Literal["token_ratio", "gate_score", "differential"]
    p: float = Field(gt=0, le=1)
    min_experts_per_layer: int = Field(ge=1)
    max_experts_per_layer: int | None = Field(None, ge=1)
    probe_tokens: dict[str, int] = Field(
        description="tokens probed per dataset, e.g. {domain: N, general: M}"
    )
    layers: tuple[LayerSelection, ...] = Field(min_length=1)
    digest: str = Field("", description="sha256 hex of the canonical JSON of the other fields")

    def content_digest(self) -> str:
        """sha256 of the canonical JSON of every field but ``digest``."""
        # fields added later are left out while unset, so older records keep the digest they were sealed with
        body = self.model_dump(mode="json", exclude={"digest"})
        if self.model_type is None:
            del body["model_type"]
        for layer in body["layers"]:
            if layer["mass"] is None:
                del layer["mass"]
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> ExpertSelection:
        """A copy whose ``digest`` is filled in."""
        return self.model_copy(update={"digest": self.content_digest()})

    @property
    def experts_by_layer(self) -> dict[int, list[int]]:
        """``{layer: [expert, ...]}`` of the selected experts."""
        return {entry.layer: list(entry.experts) for entry in self.layers}

    @property
    def num_selected(self) -> int:
        return sum(len(entry.experts) for entry in self.layers)


class LayerScores(_Strict):
    """One MoE layer's expert scores, probed elsewhere (``connito select --from-scores``)."""

    layer: int = Field(ge=0)
    scores: tuple[float, ...] = Field(
        min_length=1, description="per-expert score to rank by, index = expert id"
    )
    mass: tuple[float, ...] | None = Field(
        None, description="per-expert share summed against p; required for differential, else the scores"
    )


class ScoreFile(_Strict):
    """Per-layer expert scores an owner computed with another probe, to select from with connito's rule."""

    schema_version: Literal[1] = 1
    method: Literal["token_ratio", "gate_score", "differential"]
    probe_tokens: dict[str, int] = Field(description="tokens probed per dataset, e.g. {domain: N}")
    layers: tuple[LayerScores, ...] = Field(min_length=1)


def load_score_file(path: str | Path) -> ScoreFile:
    """Read a score file (JSON).

    Raises:
        ConfigError: unreadable or malformed, naming the first bad field.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", path=str(path)) from None
    try:
        return ScoreFile.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(x) for x in err["loc"]) or "<root>"
        raise ConfigError(err["msg"], path=str(path), field=field) from None


def save_selection(selection: ExpertSelection, path: str | Path) -> None:
    """Write the sealed selection as JSON, atomically."""
    sealed = selection if selection.digest else selection.sealed()
    atomic_write(path, (sealed.model_dump_json(indent=2) + "\n").encode("utf-8"))


def load_selection(path: str | Path) -> ExpertSelection:
    """Read a selection JSON and check its digest.

    Raises:
        ConfigError: unreadable, malformed, or the digest does not match the content.
    """
    path_str = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", path=path_str) from None
    try:
        selection = ExpertSelection.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(x) for x in err["loc"]) or "<root>"
        raise ConfigError(err["msg"], path=path_str, field=field) from None
    if selection.digest != selection.content_digest():
        raise ConfigError("digest does not match the content", path=path_str, field="digest")
    return selection


def load_domain_selection(path: Path, config: DomainConfig) -> ExpertSelection:
    """The owner's selection for ``config``'s domain, checked against the config when a node starts.

    Raises:
        ConfigError: unreadable, tampered, for another domain, or the config's document pools are
            larger than the model's expert count (caught here, not at the first training step).
    """
    selection = load_selection(path)
    if selection.domain != config.name:
        raise ConfigError(
            f"selection is for domain {selection.domain!r}, config is {config.name!r}", path=str(path)
        )
    pools = config.training.document_pools
    num_experts = len(selection.layers[0].scores) if selection.layers else 0
    if pools and num_experts and max(pools) > num_experts:
        raise ConfigError(
            f"pool size {max(pools)} exceeds the model's {num_experts} experts per layer",
            field="training.document_pools",
        )
    return selection
