"""The expert library: every published global version of every domain, composed and exported.

``Library`` is the index (``index.sqlite`` plus content-addressed expert tensors); ``compose``
builds a full model from lanes of versions; ``export_domain`` writes a right-sized model for one
domain; ``record_global`` is the validators' hook, ``rebuild_library`` rebuilds from the chain
and the store, and ``record_eval`` attaches ``connito owner-eval``
results to a version. Heavy modules are imported on first use so ``connito library list`` stays
quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connito.library.index import INDEX_FILE, Library, LibraryEvent, record_eval
from connito.library.records import (
    LATEST,
    Contributor,
    StoreLocation,
    VersionDraft,
    VersionRecord,
    parse_version,
    version_name,
)

if TYPE_CHECKING:
    from connito.library.composition import Composition, compose, load_library_base, save_composition
    from connito.library.export import ExportReport, export_domain, prune_model
    from connito.library.recorder import LIBRARY_EVAL_SEED, rebuild_library, record_global

__all__ = [
    "INDEX_FILE",
    "LATEST",
    "Library",
    "LibraryEvent",
    "VersionDraft",
    "VersionRecord",
    "Contributor",
    "StoreLocation",
    "parse_version",
    "version_name",
    "record_eval",
    "Composition",
    "compose",
    "save_composition",
    "load_library_base",
    "ExportReport",
    "export_domain",
    "prune_model",
    "LIBRARY_EVAL_SEED",
    "record_global",
    "rebuild_library",
]

_LAZY = {
    "Composition": "composition",
    "compose": "composition",
    "save_composition": "composition",
    "load_library_base": "composition",
    "ExportReport": "export",
    "export_domain": "export",
    "prune_model": "export",
    "LIBRARY_EVAL_SEED": "recorder",
    "record_global": "recorder",
    "rebuild_library": "recorder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"connito.library.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
