"""Checkpoint stores: where miners publish expert checkpoints and validators fetch them.

``CheckpointStore`` is the seam; ``LocalStore`` (a directory, the embedded default) and
``HfHubStore`` (the Hugging Face Hub) implement it. ``HfHubStore`` is imported lazily so that
code using only the local store never imports huggingface_hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connito.hub.base import (
    CHECKPOINT_FILES,
    CheckpointStore,
    StoreRef,
    validate_file_names,
    validate_repo_id,
)
from connito.hub.local import LocalStore

if TYPE_CHECKING:
    from connito.hub.hf import HfHubStore

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointStore",
    "HfHubStore",
    "LocalStore",
    "StoreRef",
    "validate_file_names",
    "validate_repo_id",
]


def __getattr__(name: str) -> Any:
    if name == "HfHubStore":
        from connito.hub.hf import HfHubStore

        return HfHubStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
