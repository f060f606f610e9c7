"""Domain configuration: the YAML a subnet owner writes, parsed into frozen pydantic models.

Every protocol parameter (phase lengths, selection rule, scoring and merge settings) lives here
and nowhere else; it is hashed into ``config_digest`` which nodes log at start and commitments
bind. Unknown keys are errors, and a bad file fails with one line: ``file: field.path: reason``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connito.errors import ConfigError

__all__ = [
    "ModelConfig",
    "DataSource",
    "TokenizerConfig",
    "DataConfig",
    "SelectionConfig",
    "TrainingConfig",
    "CycleConfig",
    "ScoringConfig",
    "MergeConfig",
    "DomainConfig",
    "load_domain_config",
    "parse_domain_config",
    "config_digest",
]

DTYPES = ("float32", "bfloat16", "float16")
MAX_INLINE_DEPTH = 16  # transformers configs nest two or three levels (rope_scaling, quantization)
MAX_INLINE_VALUES = 100_000  # YAML aliases can fan a few lines out to 10**9 values ("billion laughs")
# Error messages show the offending input through this: bounded length and nesting, so a
# megabyte string or a 5000-deep list still gives one short line (and no RecursionError).
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 3, 4, 4
_JSON_SCALARS = (str, int, float, bool, type(None))
_LIBRARY_BASE = re.compile(r"library:[a-z0-9][a-z0-9_-]{0,31}@v[1-9][0-9]{0,8}")  # connito.library names
# PyYAML's safe constructors convert tagged scalars without checking them first: ``!!bool abc``
# raises KeyError, ``!!int`` (empty) IndexError, ``!!timestamp abc`` AttributeError, ``!!int abc``
# or a 5000-digit int ValueError, and deep nesting RecursionError. All are bad YAML, not bugs.
_YAML_CONSTRUCTOR_ERRORS = (
    ArithmeticError,
    AttributeError,
    LookupError,
    RecursionError,
    TypeError,
    ValueError,
)


class _Strict(BaseModel):
    # No NaN or Inf in any float field: ``.inf`` for an lr or a tolerance is never a setting
    # (off is None), and NaN compares false against every bound the scorer and merge rely on.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_json_data(inline: dict[str, Any]) -> None:
    """Raise ValueError unless ``inline`` is plain, bounded JSON data (what ``config_digest`` hashes).

    Iterative with a budget on depth and on values visited, so neither deep nesting nor aliased
    fan-out can exhaust the stack or the CPU.
    """
    stack: list[tuple[Any, int]] = [(inline, 0)]
    visited = 0
    while stack:
        value, depth = stack.pop()
        visited += 1
        if visited > MAX_INLINE_VALUES or depth > MAX_INLINE_DEPTH:
            raise ValueError(
                f"inline config exceeds {MAX_INLINE_VALUES} values or {MAX_INLINE_DEPTH} levels of nesting"
            )
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise ValueError("inline config keys must be strings")
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)
        elif not isinstance(value, _JSON_SCALARS):
            raise ValueError(f"inline config values must be JSON data, got a {type(value).__name__}")
        elif isinstance(value, float) and not math.isfinite(value):
            # config_digest serialises NaN and Inf as null: two different configs, one digest
            raise ValueError(f"inline config values must be finite, got {value}")


class ModelConfig(_Strict):
    """Which base MoE model the domain adapts.

    Exactly one of ``id`` (a Hub model id or a local folder), ``inline`` (a transformers config
    dict with ``model_type``, for tiny offline models) or ``base`` (``library:VERSION``) is set.
    """

    id: str | None = Field(None, description="Hub model id or local folder of a pretrained MoE")
    revision: str = Field("main", description="Hub revision (commit sha preferred) of the base model")
    inline: dict[str, Any] | None = Field(None, description="transformers config dict for a tiny model")
    base: str | None = Field(None, description="start from an expert library version: library:DOMAIN@vN")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = Field(
        None, description="transformers experts kernel; None keeps the model default"
    )
    init_seed: int = Field(0, description="seed for initialising an inline model's weights")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [name for name in ("id", "inline", "base") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"set exactly one of id, inline, base (got {sources or 'none'})")
        if self.inline is not None and "model_type" not in self.inline:
            raise ValueError("inline config needs a model_type")
        if self.inline is not None:
            _check_json_data(self.inline)  # YAML dates, bytes or sets would break config_digest
        if self.base is not None and not _LIBRARY_BASE.fullmatch(self.base):
            # a pinned version only: 'latest' would let two nodes' libraries start different experts
            raise ValueError(
                f"base must be library:DOMAIN@vN (a pinned library version), got {_SHOWN.repr(self.base)}"
            )
        return self

    @property
    def name(self) -> str:
        """A stable human name for the base model (used in manifests and selections)."""
        if self.id is not None:
            return self.id
        if self.base is not None:
            return self.base
        return f"inline:{self.inline['model_type']}"  # type: ignore[index]


class DataSource(_Strict):
    """One text source.

    ``kind``: ``generated`` (``name`` is one of connito's offline generators: ``math``,
    ``english``, ``code``), ``hub`` (``name`` is a Hub dataset id loaded with ``datasets``) or
    ``files`` (``name`` is a glob of local json/jsonl/txt/parquet files).
    """

    kind: Literal["generated", "hub", "files"] = Field(
        description="generated: a connito offline generator; hub: a Hub dataset; files: local files"
    )
    name: str = Field(
        min_length=1,
        description="generator name (math, english, code), Hub dataset id, or a glob of local files",
    )
    subset: str | None = Field(None, description="datasets config name")
    revision: str | None = Field(
        None, description="hub: dataset revision (commit sha preferred); None reads the moving main branch"
    )
    split: str = Field("train", description="datasets split")
    text_field: str = Field("text", description="column holding the document text")
    max_documents: int | None = Field(None, ge=1, description="cap on documents read; None reads all")
    weight: float = Field(1.0, gt=0, description="mixing weight when several sources are given")


class TokenizerConfig(_Strict):
    """Tokenizer: a Hub/local tokenizer, or a byte-level BPE connito trains and caches."""

    kind: Literal["pretrained", "local_bpe"] = Field(
        "pretrained",
        description="pretrained: load a tokenizer; local_bpe: train a byte-level BPE and cache it",
    )
    id: str | None = Field(None, description="tokenizer id or folder; None uses the model id")
    vocab_size: int = Field(4096, ge=256, description="vocabulary size of a local_bpe tokenizer")


class DataConfig(_Strict):
    """Where training, held-out and general text come from."""

    train: list[DataSource] = Field(min_length=1, description="domain text miners train on")
    validation: list[DataSource] = Field(
        default_factory=list,
        description="explicit held-out domain text; when empty, held-out docs are split from train by hash",
    )
    general: list[DataSource] = Field(default_factory=list, description="general-domain reference text")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of train docs held out by hash")
    sequence_length: int = Field(256, ge=8, description="tokens per packed sequence")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="how text becomes tokens")


class SelectionConfig(_Strict):
    """ESFT expert selection (paper: Wang et al. 2024, section 3)."""

    method: Literal["token_ratio", "gate_score", "differential"] = Field(
        "token_ratio",
        description="rank experts by share of routed tokens, by mean gate score, or by domain minus general share",
    )
    p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="cumulative share to reach per layer; default 0.2 token_ratio, 0.1 gate_score",
    )
    min_experts_per_layer: int = Field(1, ge=1, description="experts selected in every MoE layer at least")
    max_experts_per_layer: int | None = Field(
        None,
        ge=1,
        description="experts selected per layer at most; must be >= min_experts_per_layer; None: no cap",
    )
    probe_tokens: int = Field(131072, ge=16, description="domain tokens forwarded to measure routing")
    probe_batch_size: int = Field(8, ge=1, description="sequences per probing forward pass")

    @model_validator(mode="after")
    def _bounds(self) -> SelectionConfig:
        if self.max_experts_per_layer is not None and self.max_experts_per_layer < self.min_experts_per_layer:
            raise ValueError(
                f"max_experts_per_layer ({self.max_experts_per_layer}) < min_experts_per_layer "
                f"({self.min_experts_per_layer})"
            )
        return self

    @property
    def threshold(self) -> float:
        """The p actually used: explicit, or the ESFT default for the method."""
        if self.p is not None:
            return self.p
        return 0.1 if self.method == "gate_score" else 0.2


class TrainingConfig(_Strict):
    """The miners' inner optimisation: AdamW on the selected experts only."""

    inner_steps: int = Field(100, ge=1, description="H: optimizer steps per cycle")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decoupled weight decay, on the selected experts only"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None disables")
    residency: Literal["full", "subset"] = Field(
        "subset", description="full: whole model resident; subset: only selected experts resident"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, about a third more compute"
    )
    assignment_fraction: float | None = Field(
        1 / 128,
        gt=0,
        le=0.25,
        description="share of the training documents assigned to each miner each cycle, and to nobody (the "
        "control set), by (domain, cycle, hotkey): the data a miner must train on and its own-work evidence. "
        "Size it so that H inner steps pass over it several times; None: fixed shards by uid, no own-work check",
    )
    seed: int = Field(
        0, description="torch seed of the trainer; also mixed into each miner's per-cycle data order"
    )
    keep_optimizer_state: bool = Field(
        True,
        description="carry the AdamW moments from one cycle to the next (DiLoCo keeps each worker's inner "
        "optimizer state); the weights still restart from the new global. Only with beta1^2 < beta2, where "
        "the validators' update bound holds at any step count",
    )
    payload: Literal["fp", "int8"] = Field(
        "fp",
        description="what a miner uploads: fp, the trained experts; int8, their delta from the global as "
        "per-row int8 with fp32 scales (about 2x smaller than bf16, 4x than fp32); validators accept both",
    )
    document_pools: tuple[int, ...] | None = Field(
        None,
        description="train with EMO document expert pools: each sequence's tokens pick their top-k inside a "
        "pool of this many experts (drawn per sequence from the list) that the router prefers for the "
        "sequence; the experts keep working with the few the domain's tokens prefer, so an export of "
        "those stays close to the full model. Needs residency: full; None: plain routing",
    )

    @model_validator(mode="after")
    def _pools_need_full_residency(self) -> TrainingConfig:
        if self.document_pools is not None:
            if not self.document_pools or min(self.document_pools) < 1:
                raise ValueError(f"document_pools must list pool sizes >= 1, got {self.document_pools}")
            if self.residency != "full":
                raise ValueError(
                    "document_pools needs residency: full (a subset already routes among few experts)"
                )
        return self


class CycleConfig(_Strict):
    """Phase lengths in blocks; a cycle is train, commit, reveal, evaluate, merge in that order."""

    train_blocks: int = Field(ge=1, description="blocks in which miners pull the global experts and train")
    commit_blocks: int = Field(ge=1, description="blocks in which miners commit their checkpoint digest")
    reveal_blocks: int = Field(ge=1, description="blocks in which miners upload and reveal where")
    evaluate_blocks: int = Field(ge=1, description="blocks in which validators verify, score and set weights")
    merge_blocks: int = Field(ge=1, description="blocks in which the lead validator merges and publishes")
    genesis_block: int = Field(0, ge=0, description="block at which cycle 0 starts")

    @property
    def cycle_blocks(self) -> int:
        return (
            self.train_blocks
            + self.commit_blocks
            + self.reveal_blocks
            + self.evaluate_blocks
            + self.merge_blocks
        )


class ScoringConfig(_Strict):
    """Proof-of-Loss scoring, ranking and weights."""

    eval_batches: int = Field(8, ge=1, description="held-out batches in each cycle's seeded sample")
    eval_batch_size: int = Field(8, ge=1, description="sequences per evaluation batch")
    general_batches: int = Field(4, ge=0, description="general-domain batches for the forgetting guard")
    general_tolerance: float = Field(
        0.02, ge=0, description="max relative general-loss increase over the global model"
    )
    general_drift_limit: float | None = Field(
        None,
        ge=0,
        description="the lead publishes no global whose general loss exceeds the base model's experts' by "
        "more than this, across all cycles (general_tolerance alone bounds each cycle, so forgetting could "
        "add up); None: no cumulative cap",
    )
    min_improvement: float = Field(0.0, ge=0, description="loss drop below which a submission is lazy")
    duplicate_cosine: float = Field(0.99, gt=0, le=1, description="pseudo-gradient cosine marking a copy")
    top_k: int = Field(8, ge=1, description="miners rewarded per cycle")
    rank_weighting: Literal["linear", "exponential", "winner_take_all"] = Field(
        "exponential", description="how a cycle's ranks of accepted submissions become weights"
    )
    rank_decay: float = Field(0.5, gt=0, lt=1, description="ratio between consecutive ranks (exponential)")
    ema_alpha: float = Field(0.5, gt=0, le=1, description="weight of the newest cycle in the score EMA")
    burn_share: float = Field(
        0.0, ge=0, le=1, description="share of weight sent to owner_uid; > 0 needs owner_uid"
    )
    owner_uid: int | None = Field(None, ge=0, description="uid receiving burn_share; None: no burn")
    max_payload_bytes: int = Field(512 * 2**20, ge=1, description="cap on a checkpoint's download size")
    max_manifest_bytes: int = Field(
        64 * 1024, ge=256, description="cap on manifest.json, checked before reading it"
    )
    own_work_margin: float | None = Field(
        0.02,
        description="an update must lower the loss on its assigned documents by this much more (relative) "
        "than on the cycle's control documents; None: no own-work check",
    )
    own_work_batches: int = Field(3, ge=1, description="batches each of assigned and control data per check")
    replay_cycles: int = Field(
        3,
        ge=0,
        description="earlier cycles whose accepted pseudo-gradients and merge a submission may not repeat",
    )
    normalised_step: bool = Field(
        True, description="score every update at the cycle's median update norm, so scaling one gains nothing"
    )
    update_bound_factor: float | None = Field(
        2.0,
        gt=0,
        description="reject a submission that moved any expert weight more than this multiple of what "
        "training.inner_steps AdamW steps at training.lr can move it (connito.ml.update_bound); None disables",
    )

    @model_validator(mode="after")
    def _burn(self) -> ScoringConfig:
        if self.burn_share > 0 and self.owner_uid is None:
            raise ValueError("burn_share > 0 needs owner_uid")
        return self


class MergeConfig(_Strict):
    """The DiLoCo outer step applied by the lead validator."""

    top_n: int = Field(3, ge=1, description="accepted submissions merged per cycle")
    outer_lr: float = Field(0.7, gt=0, description="outer SGD learning rate on the averaged pseudo-gradient")
    momentum: float = Field(0.9, ge=0, lt=1, description="outer momentum (lr 1, momentum 0: plain averaging)")
    nesterov: bool = Field(True, description="Nesterov momentum in the outer step")
    clip_norm: float | None = Field(
        4.0, gt=0, description="clip each pseudo-gradient to this multiple of the median norm; None disables"
    )


class DomainConfig(_Strict):
    """A whole domain: the one file a subnet owner edits."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="domain name, bound into commitments"
    )
    netuid: int = Field(0, ge=0, description="subnet uid")
    model: ModelConfig = Field(description="the base MoE")
    data: DataConfig = Field(description="training, held-out and general text")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="which experts are trained"
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the miners' inner loop")
    cycle: CycleConfig = Field(description="phase lengths in blocks")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Proof-of-Loss and weights")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="the lead validator's outer step")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = str(item)  # an unknown key is untrusted text: keep the message on one short line
            name = name if name.isprintable() and len(name) <= 64 else _SHOWN.repr(name)
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "<root>"


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-after")))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif "input" in err and err["type"] not in ("model_type", "dict_type"):
        message = f"{message}, got {_SHOWN.repr(err['input'])}"
    return _field_path(loc), message.replace("Value error, ", "")


def parse_domain_config(data: Any, *, path: str = "<config>") -> DomainConfig:
    """Validate an already-parsed YAML document.

    Raises:
        ConfigError: the first violation, as ``path: field: reason``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", path=path)
    try:
        return DomainConfig.model_validate(data)
    except ValidationError as exc:
        field, message = _first_error(exc)
        raise ConfigError(message, path=path, field=field) from None


def load_domain_config(path: str | Path) -> DomainConfig:
    """Read and validate a domain YAML file (``yaml.safe_load``: data, never code).

    Raises:
        ConfigError: unreadable file, bad YAML, or a schema violation.
    """
    path_str = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc.__class__.__name__}: {exc}", path=path_str) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", path=path_str, field=where) from None
    except _YAML_CONSTRUCTOR_ERRORS as exc:
        detail = _SHOWN.repr(str(exc).splitlines()[0] if str(exc) else "")
        message = f"invalid YAML: {type(exc).__name__} {detail}"
        raise ConfigError(message, path=path_str, field="yaml") from None
    return parse_domain_config(data, path=path_str)


def config_digest(config: DomainConfig) -> str:
    """sha256 of the canonical JSON of every protocol parameter (hex, 64 chars)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
