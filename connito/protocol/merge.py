"""The lead validator's merge: a DiLoCo outer step over the top accepted submissions, and its record.

The merge is deterministic given (parent global state, outer optimizer state, inputs in order,
weights, outer parameters), so any validator recomputes it from the ``MergeRecord`` and checks the
resulting tensor digest bit for bit before adopting it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from connito.config import MergeConfig
from connito.ml.outer import OuterOptimizer, OuterState
from connito.protocol.checkpoint import tensors_digest

__all__ = [
    "MERGE_RECORD_FILE",
    "OUTER_STATE_FILE",
    "MergeInput",
    "OuterParams",
    "MergeRecord",
    "apply_merge",
    "adopt_single",
    "record_digest",
    "initial_outer_state",
    "state_revision",
]

MERGE_RECORD_FILE = "merge_record.json"
OUTER_STATE_FILE = "outer_state.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeInput(_Strict):
    """One submission that entered the merge, pinned by its tensor digest and location."""

    hotkey: str = Field(max_length=64)
    uid: int = Field(ge=0)
    tensors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight: float = Field(gt=0)
    store_kind: str = Field(max_length=16)
    repo: str = Field(max_length=128)
    revision: str = Field(max_length=64)


class OuterParams(_Strict):
    lr: float
    momentum: float
    nesterov: bool
    clip_norm: float | None


class MergeRecord(_Strict):
    """What the lead validator published for a cycle, and how anyone can recompute it."""

    schema_version: Literal[1] = 1
    domain: str = Field(max_length=32)
    cycle: int = Field(ge=0)
    parent_revision: str = Field(pattern=r"^[0-9a-f]{64}$", description="global tensors digest merged into")
    decision: Literal["merged", "best_single"]
    inputs: tuple[MergeInput, ...] = Field(min_length=1, max_length=256)
    outer: OuterParams
    outer_step_before: int = Field(ge=0, description="outer optimizer steps taken before this merge")
    result_revision: str = Field(pattern=r"^[0-9a-f]{64}$", description="tensors digest of the new global")
    global_domain_loss: float
    result_domain_loss: float
    eval_seed: int = Field(ge=0)
    lead_hotkey: str = Field(max_length=64)


def record_digest(record: MergeRecord) -> str:
    """sha256 (hex) of the record's canonical JSON; bound on chain by the global commitment."""
    canonical = json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def apply_merge(
    outer_state: OuterState,
    submissions: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    merge: MergeConfig,
) -> tuple[dict[str, torch.Tensor], OuterState]:
    """One outer step from ``outer_state``: returns (new global experts, new outer state).

    Pure: the caller's ``outer_state`` is not modified, so a crash or a rejected merge leaves the
    persisted optimizer untouched (no double merge on restart).
    """
    optimizer = _optimizer(outer_state, merge)
    new_state = optimizer.step(list(submissions), list(weights), clip_norm=merge.clip_norm)
    return new_state, optimizer.state_dict()


def adopt_single(outer_state: OuterState, submission: Mapping[str, torch.Tensor]) -> OuterState:
    """The outer state after publishing one submission as is: master moves there, momentum kept."""
    master = {key: submission[key].detach().to(torch.float32, copy=True) for key in outer_state.master}
    return OuterState(
        master=master,
        momentum={k: v.clone() for k, v in outer_state.momentum.items()},
        dtypes=dict(outer_state.dtypes),
        step=outer_state.step,
    )


def _optimizer(outer_state: OuterState, merge: MergeConfig) -> OuterOptimizer:
    template = {key: outer_state.master[key].to(outer_state.dtypes[key]) for key in outer_state.master}
    optimizer = OuterOptimizer(template, lr=merge.outer_lr, momentum=merge.momentum, nesterov=merge.nesterov)
    optimizer.load_state_dict(outer_state)
    return optimizer


def initial_outer_state(global_state: Mapping[str, torch.Tensor]) -> OuterState:
    """Fresh outer state for the genesis global experts (zero momentum, step 0)."""
    return OuterOptimizer(global_state).state_dict()


def state_revision(state: Mapping[str, torch.Tensor]) -> str:
    """The global revision of an expert state: its tensor digest."""
    return tensors_digest(state)
