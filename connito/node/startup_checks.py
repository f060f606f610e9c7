"""What a neuron checks once, at start, so that a fault it cannot heal stops it with one line.

Without these checks a selection built for another model with the same domain name starts and
then fails every tick with a ``KeyError`` traceback, and a truncated state file gives a pydantic
traceback that does not name the file. Here each fault becomes one line naming the file and the
field, before the loop starts. State files are never modified here: a person decides whether to
restore or move them aside.

May import: connito.config, connito.errors, connito.ml.selection_record, connito.protocol.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from connito.config import DomainConfig
from connito.errors import ConfigError, InvalidSubmission, StateError
from connito.ml.selection_record import ExpertSelection
from connito.node.validator_state import ValidatorState
from connito.protocol.global_state import GlobalState
from connito.protocol.safetensors_header import read_safetensors_header

__all__ = [
    "check_selection_matches_model",
    "model_experts_per_layer",
    "load_state_file",
    "recover_missing_global",
]

logger = logging.getLogger(__name__)

# save_pretrained writes one key per expert (``model.layers.L.mlp.experts.E.gate_proj.weight``,
# Mixtral ``block_sparse_moe.experts.E.w1``): the checkpoint's keys say which layers are MoE
# layers and how many experts each has, without loading a tensor.
_EXPERT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?experts\.(\d+)\.")
_NO_CAP_BYTES = 2**60  # the base model is the operator's own file: only its header is read

M = TypeVar("M", bound=BaseModel)


def model_experts_per_layer(base_dir: Path) -> dict[int, int]:
    """``{layer: number of experts}`` of the checkpoint in ``base_dir``, from safetensors headers.

    Raises:
        ConfigError: the folder has no readable safetensors file.
    """
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError("no *.safetensors file in the base model folder", path=str(base_dir))
    experts: dict[int, set[int]] = {}
    for path in files:
        try:
            header = read_safetensors_header(path, max_bytes=_NO_CAP_BYTES)
        except InvalidSubmission as exc:
            raise ConfigError(f"not a readable safetensors file: {exc.detail}", path=str(path)) from None
        for key in header:
            match = _EXPERT_KEY.search(key)
            if match is not None:
                experts.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return {layer: max(ids) + 1 for layer, ids in sorted(experts.items())}


def check_selection_matches_model(
    selection: ExpertSelection, *, selection_path: Path, config: DomainConfig, base_dir: Path
) -> None:
    """Refuse a selection that does not describe this domain's base model.

    Compares the selection's model id, revision and method with the domain config, and its layer
    indices and experts per layer with the checkpoint in ``base_dir``. A selection made from a
    local folder (``local:NAME``) is not held to the Hub revision.

    Raises:
        ConfigError: the first mismatch, naming the selection file and the field.
    """
    where = str(selection_path)
    model = config.model
    if selection.model_id != model.name:
        raise ConfigError(
            f"selection is for model {selection.model_id!r}, the config's model is {model.name!r}",
            path=where,
            field="model_id",
        )
    pinned = model.id is not None and not selection.model_revision.startswith("local:")
    if pinned and selection.model_revision != model.revision:
        raise ConfigError(
            f"selection is for revision {selection.model_revision!r}, model.revision is {model.revision!r}",
            path=where,
            field="model_revision",
        )
    if selection.method != config.selection.method:
        raise ConfigError(
            f"selection method {selection.method!r}, the config's selection.method is {config.selection.method!r}",
            path=where,
            field="method",
        )
    per_layer = model_experts_per_layer(base_dir)
    for i, entry in enumerate(selection.layers):
        if entry.layer not in per_layer:
            raise ConfigError(
                f"layer {entry.layer} is not an MoE layer of the base model (MoE layers: {sorted(per_layer)})",
                path=where,
                field=f"layers.{i}.layer",
            )
        if len(entry.scores) != per_layer[entry.layer]:
            raise ConfigError(
                f"layer {entry.layer} scores {len(entry.scores)} experts, the base model has {per_layer[entry.layer]}",
                path=where,
                field=f"layers.{i}.scores",
            )


def load_state_file(path: Path, model: type[M]) -> M | None:
    """A node's own durable state file, or None when it does not exist yet.

    A truncated or inconsistent file is left untouched (the operator may restore it) and
    reported in one line naming the file and the first bad field.

    Raises:
        StateError: the file cannot be read or does not parse as ``model``.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise StateError(
            f"{path}: {field}: {first['msg']} ({len(raw)} bytes; left untouched: restore it, or move it "
            "aside to start this node's state afresh)"
        ) from None


def recover_missing_global(
    state: ValidatorState, folder: Path, state_path: Path, genesis: GlobalState
) -> GlobalState:
    """A state file names a global folder that is gone: start from genesis and re-sync.

    Loading the folder would fail at every poll, forever. The global a node holds is public (the
    lead's publication on chain and in the store), so the node resets its adopted cycle, says so
    in one WARNING line, and adopts the newest publication at its next sync like a new validator.
    Its scores, EMA and cycle results are kept.
    """
    logger.warning(
        "%s: global_cycle=%d names %s, which is missing: recovering from genesis, then chain and store",
        state_path,
        state.global_cycle,
        folder,
    )
    state.global_cycle = -1
    return genesis
