"""``connito owner-eval``: downstream benchmarks of the global model, recorded in the expert library.

Proof-of-Loss says the global model got better on held-out domain text; an owner also wants the
numbers the field reports (GSM8K, MMLU). This runs them through EleutherAI's lm-evaluation-harness
(``lm_eval``) on the global model: the base model holding the global expert state, built from a
folder the lead validator published, a full model folder, or a library version. The harness is an
optional dependency, imported only here, only when the command runs; without it the command fails
with one line naming the install. The result is written as JSON next to the model and recorded
against the version in the expert library through ``connito.library.record_eval``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from connito.errors import ConfigError, ConnitoError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from connito.config import DomainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LM_EVAL_MISSING",
    "OwnerEvalResult",
    "GlobalModel",
    "add_owner_eval_parser",
    "import_harness",
    "evaluate_with_harness",
    "load_global_model",
    "record_result",
    "run_owner_eval",
]

LM_EVAL_MISSING = (
    "lm-evaluation-harness is not installed: pip install lm-eval "
    "(its transformers backend: pip install 'lm-eval[hf]')"
)
RESULT_SCHEMA_VERSION = 1
RESULT_PREFIX = "owner-eval-"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class OwnerEvalResult(BaseModel):
    """One owner evaluation: which model, which tasks, the harness's metrics per task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = RESULT_SCHEMA_VERSION
    version: str = Field(min_length=1, description="the library version (or label) evaluated")
    domain: str
    model_source: str = Field(description="global-state:DIR, model:DIR or library:LIB")
    base_model: str
    global_revision: str | None = Field(None, description="tensors digest of the global experts, if known")
    tasks: tuple[str, ...]
    limit: int | None = Field(None, description="documents per task; None: every document")
    num_fewshot: int | None = None
    harness_version: str
    date: str
    results: dict[str, dict[str, float | str]] = Field(description="task -> metric,filter -> value")


# The harness -------------------------------------------------------------------------------------


def import_harness() -> tuple[ModuleType, Any]:
    """``lm_eval`` and its transformers adapter class ``HFLM``, imported now (never at import time).

    Raises:
        ConfigError: the harness (or its transformers backend) is not installed.
    """
    try:
        lm_eval = importlib.import_module("lm_eval")
        huggingface = importlib.import_module("lm_eval.models.huggingface")
    except ModuleNotFoundError as exc:
        if (exc.name or "lm_eval").split(".")[0] == "lm_eval":
            raise ConfigError(LM_EVAL_MISSING) from None
        raise ConfigError(
            f"lm-evaluation-harness cannot load ({exc.name} missing): pip install 'lm-eval[hf]'"
        ) from None
    return lm_eval, huggingface.HFLM


def evaluate_with_harness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    num_fewshot: int | None,
) -> tuple[dict[str, dict[str, float | str]], str]:
    """Run the harness's own task definitions on an in-memory model: (metrics per task, harness version).

    The model object is handed to ``HFLM`` as is, so the evaluated weights are exactly the ones
    connito built (no save and reload). Metrics keep the harness's names (``acc,none``,
    ``exact_match,strict-match``...); non-numeric entries other than the task alias are dropped.

    Raises:
        ConfigError: the harness is not installed.
        ConnitoError: the harness returned no results.
    """
    lm_eval, hflm = import_harness()
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    if not isinstance(output, dict) or not isinstance(output.get("results"), dict):
        raise ConnitoError(f"lm-evaluation-harness returned no results for tasks {tasks}")
    results = {str(task): _metrics(values) for task, values in output["results"].items()}
    return results, str(getattr(lm_eval, "__version__", "unknown"))


def _metrics(values: Any) -> dict[str, float | str]:
    if not isinstance(values, dict):
        return {}
    kept: dict[str, float | str] = {}
    for name, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            kept[str(name)] = float(value)
        elif name == "alias" and isinstance(value, str):
            kept["alias"] = value
    return kept


# The global model --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalModel:
    """The model to evaluate and where it came from (tokenizer source included)."""

    model: PreTrainedModel
    source: str  # global-state:DIR | model:DIR | library:LIB
    revision: str | None  # tensors digest of the global experts, when known
    tokenizer_dir: Path | None


def load_global_model(
    config: DomainConfig,
    *,
    model_dir: Path | None,
    library: Path | None,
    version: str,
    base_dir: Path | None,
    selection_path: Path | None,
) -> GlobalModel:
    """Build the model to evaluate.

    - ``model_dir`` holding ``manifest.json``: a global expert state (the lead's publication, e.g.
      ``WORKDIR/global/<cycle>``), checked by the strict loader and written into the base model;
    - ``model_dir`` without one: a complete ``save_pretrained`` model (e.g. ``connito library compose``);
    - no ``model_dir``: the library version ``version``, composed onto its base by ``connito.library``.

    Raises:
        ConfigError: a missing input (selection, library support) or an unreadable model.
        InvalidSubmission: the global state's files fail the strict checks.
    """
    from connito.protocol.checkpoint import MANIFEST_FILE

    if model_dir is not None and (model_dir / MANIFEST_FILE).is_file():
        return _from_global_state(config, model_dir, base_dir=base_dir, selection_path=selection_path)
    if model_dir is not None:
        from connito.ml.modeling import load_model

        if not (model_dir / "config.json").is_file():
            raise ConfigError(
                "neither a global state (manifest.json) nor a model (config.json)", path=str(model_dir)
            )
        return GlobalModel(
            model=load_model(model_dir, config.model),
            source=f"model:{model_dir}",
            revision=None,
            tokenizer_dir=model_dir,
        )
    if library is None:
        raise ConfigError("give --model DIR or --library LIB", field="--model")
    return _from_library(library, version, base_dir=base_dir)


def _from_global_state(
    config: DomainConfig, folder: Path, *, base_dir: Path | None, selection_path: Path | None
) -> GlobalModel:
    from connito.ml.moe import read_experts, write_experts
    from connito.ml.selection_record import load_selection
    from connito.owner.bootstrap import load_base_model
    from connito.protocol.checkpoint import ExpertSpec
    from connito.protocol.global_state import load_global

    if selection_path is None:
        raise ConfigError(
            "a global state folder needs --selection (the domain's SELECTION.json)", field="--selection"
        )
    selection = load_selection(selection_path)
    if selection.domain != config.name:
        raise ConfigError(
            f"selection is for domain {selection.domain!r}, config is {config.name!r}",
            path=str(selection_path),
        )
    model = load_base_model(config, base_dir)
    base_experts = read_experts(model, selection.experts_by_layer)
    expected = {key: ExpertSpec(tuple(t.shape), t.dtype) for key, t in base_experts.items()}
    state = load_global(
        folder,
        selection=selection,
        expected=expected,
        max_bytes=config.scoring.max_payload_bytes * 4,
        cycle=-1,
    )
    write_experts(model, state.experts)
    logger.info(
        "owner-eval global state loaded dir=%s rev=%s experts=%d",
        folder,
        state.revision[:12],
        len(state.experts),
    )
    tokenizer_dir = base_dir if base_dir is not None else (Path(config.model.id) if config.model.id else None)
    return GlobalModel(
        model=model, source=f"global-state:{folder}", revision=state.revision, tokenizer_dir=tokenizer_dir
    )


def _from_library(library: Path, version: str, *, base_dir: Path | None) -> GlobalModel:
    """The library version on its base model, composed by the library itself (one lane)."""
    try:
        from connito.library import Library, compose
    except ImportError as exc:
        raise ConfigError(
            f"this connito cannot read libraries ({exc}); pass --model DIR", field="--library"
        ) from None
    lib = Library(library)
    record = lib.get(version)
    composition = compose(lib, [version], base_dir=base_dir)
    location = Path(composition.base_location)
    return GlobalModel(
        model=composition.model,
        source=f"library:{library}",
        revision=record.tensors_sha256,
        tokenizer_dir=location if location.is_dir() else None,
    )


def _tokenizer(config: DomainConfig, tokenizer_dir: Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model, else the one the domain config names."""
    from connito.data.tokenizer import load_pretrained_tokenizer

    if tokenizer_dir is not None and any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        return load_pretrained_tokenizer(str(tokenizer_dir))
    spec = config.data.tokenizer
    if spec.kind == "pretrained" and (spec.id or config.model.id):
        if spec.id is not None:
            return load_pretrained_tokenizer(spec.id)
        return load_pretrained_tokenizer(str(config.model.id), revision=config.model.revision)
    raise ConfigError(
        "no tokenizer beside the model and none named by the config: pass --base DIR", field="--base"
    )


# Recording ---------------------------------------------------------------------------------------


def record_result(result: OwnerEvalResult, *, json_dir: Path, library: Path | None) -> list[str]:
    """Write the result as JSON in ``json_dir`` and record it in the library; return where it went.

    The library takes it through ``connito.library.record_eval(library_path, version, results)``.
    A library package without that function is not an error: the JSON file is the record then,
    and a WARNING says so.
    """
    from connito.fsutil import atomic_write_json

    where = []
    if library is not None:
        try:
            from connito.library import record_eval
        except ImportError:
            logger.warning("owner-eval: connito.library has no record_eval: result kept in JSON only")
        else:
            record_eval(library, result.version, result.model_dump(mode="json"))
            where.append(f"library {library} version {result.version}")
    name = RESULT_PREFIX + re.sub(r"[^A-Za-z0-9@._-]", "_", result.version) + ".json"
    atomic_write_json(json_dir / name, result.model_dump(mode="json"))
    where.append(str(json_dir / name))
    return where


# CLI ---------------------------------------------------------------------------------------------


def add_owner_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``connito owner-eval`` (kebab-case flags, one-line help with units and defaults)."""
    p = sub.add_parser("owner-eval", help="GSM8K/MMLU (any lm-evaluation-harness task) on the global model")
    p.add_argument("--config", required=True, type=Path, help="domain YAML")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        type=Path,
        default=None,
        help="global state folder (manifest.json) or a save_pretrained model folder",
    )
    source.add_argument(
        "--library", type=Path, default=None, help="expert library folder: evaluate --version from it"
    )
    p.add_argument(
        "--record-in",
        type=Path,
        default=None,
        help="with --model: also record the result in this library (default: none)",
    )
    p.add_argument(
        "--version", required=True, help="library version evaluated, e.g. math@v3 (also the result's label)"
    )
    p.add_argument(
        "--tasks",
        default="gsm8k,mmlu",
        help="comma-separated lm-evaluation-harness tasks (default gsm8k,mmlu)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="documents per task (default: all; small N for a quick look)"
    )
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument(
        "--selection", type=Path, default=None, help="the domain's SELECTION.json (needed for a global state)"
    )
    p.add_argument(
        "--base", type=Path, default=None, help="local base model folder (default: the config's model)"
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default auto)"
    )


def run_owner_eval(args: argparse.Namespace) -> int:
    """``connito owner-eval``: build the global model, run the harness, record and print the result."""
    import torch

    from connito.config import load_domain_config

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("no task given", field="--tasks")
    import_harness()  # fail in one line before loading gigabytes of weights
    config = load_domain_config(args.config)
    built = load_global_model(
        config,
        model_dir=args.model,
        library=args.library,
        version=args.version,
        base_dir=args.base,
        selection_path=args.selection,
    )
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    model = built.model.to(device).eval()
    tokenizer = _tokenizer(config, built.tokenizer_dir or args.base)
    results, harness_version = evaluate_with_harness(
        model,
        tokenizer,
        tasks=tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
    )
    result = OwnerEvalResult(
        version=args.version,
        domain=config.name,
        model_source=built.source,
        base_model=config.model.name,
        global_revision=built.revision,
        tasks=tuple(tasks),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        harness_version=harness_version,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        results=results,
    )
    library = args.library if args.library is not None else args.record_in
    json_dir = args.model if args.model is not None else args.library
    for task, metrics in results.items():
        shown = " ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k
        )
        print(f"{task}: {shown}")
    for where in record_result(result, json_dir=json_dir, library=library):
        print(f"recorded {where}")
    return 0
