"""Cross-cycle copies: an earlier accepted pseudo-gradient, or the last merge, submitted again.

The copy screen compares submissions within one cycle. A replay applies an update that was
already paid for (or already merged) to this cycle's global: with no training, it can still lower
the loss, because the old direction still points downhill. A validator therefore keeps, for the
last ``scoring.replay_cycles`` cycles, an int8 sketch of every pseudo-gradient it accepted and of
each merge it adopted (``old global - new global``, the pseudo-gradient a submission continuing
the merge's step would carry), and rejects a submission whose pseudo-gradient has a cosine at or
above ``scoring.duplicate_cosine`` with any of them (reason ``replay``). Cosine is blind to
scale, so a replay at any step length is caught; a replay with noise added is no longer the
miner's own work and fails ``connito.protocol.own_work`` instead.

The history lives in a folder (``<cycle>/<source>.safetensors``), written atomically, so it
survives restarts; only sketches are kept (one byte per weight).

May import: connito.fsutil, connito.ml.delta_sketch.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from connito.fsutil import atomic_write
from connito.ml.delta_sketch import DeltaSketch, cosine_estimate, sketch_delta

logger = logging.getLogger(__name__)

__all__ = ["MERGE_SOURCE", "ReplayHistory", "ReplayMatch"]

MERGE_SOURCE = "merge"  # the source name of a merge's update in the history


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayMatch:
    cycle: int
    source: str  # a hotkey, or MERGE_SOURCE
    cosine: float

    def describe(self) -> str:
        what = (
            "the merged update" if self.source == MERGE_SOURCE else f"hotkey={self.source}'s accepted update"
        )
        return f"pseudo-gradient cosine {self.cosine:.4f} with {what} of cycle {self.cycle}"


@dataclass
class ReplayHistory:
    """Sketches of accepted and merged pseudo-gradients by cycle, kept in ``folder``."""

    folder: Path
    _loaded: dict[int, list[tuple[str, DeltaSketch]]] = field(default_factory=dict, repr=False)

    def add(self, cycle: int, source: str, delta: torch.Tensor) -> None:
        """Keep the sketch of ``delta`` (a flat fp32 pseudo-gradient) as ``source`` of ``cycle``."""
        if not torch.isfinite(delta).all() or float(delta.abs().max()) == 0.0:
            return
        self.add_sketch(cycle, source, sketch_delta(delta))

    def add_sketch(self, cycle: int, source: str, sketch: DeltaSketch) -> None:
        """Keep ``sketch`` (of a finite, non-zero pseudo-gradient) as ``source`` of ``cycle``."""
        meta = {"norm": sketch.norm, "sketch_norm": sketch.sketch_norm, "error": sketch.error}
        blob = save({"q": sketch.q, "scales": sketch.scales}, metadata={"sketch": json.dumps(meta)})
        atomic_write(self.folder / str(cycle) / f"{_safe(source)}.safetensors", blob)
        self._loaded.pop(cycle, None)

    def match(
        self, delta_sketch: DeltaSketch, *, cycle: int, window: int, threshold: float
    ) -> ReplayMatch | None:
        """The first kept update of cycles ``[cycle - window, cycle)`` the sketch repeats, if any."""
        for old_cycle in range(cycle - 1, cycle - window - 1, -1):
            for source, old in self._load(old_cycle):
                cosine = cosine_estimate(delta_sketch, old)
                if cosine >= threshold:
                    return ReplayMatch(cycle=old_cycle, source=source, cosine=cosine)
        return None

    def prune(self, *, keep_from: int) -> None:
        """Forget cycles before ``keep_from``."""
        self._loaded = {c: v for c, v in self._loaded.items() if c >= keep_from}
        if not self.folder.is_dir():
            return
        for child in self.folder.iterdir():
            if child.is_dir() and child.name.isdigit() and int(child.name) < keep_from:
                shutil.rmtree(child, ignore_errors=True)

    def _load(self, cycle: int) -> list[tuple[str, DeltaSketch]]:
        """A cycle's sketches, read from disk once (every submission of a cycle is checked against them)."""
        if cycle not in self._loaded:
            self._loaded[cycle] = self._read(cycle)
        return self._loaded[cycle]

    def _read(self, cycle: int) -> list[tuple[str, DeltaSketch]]:
        folder = self.folder / str(cycle)
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    tensors = {name: handle.get_tensor(name) for name in ("q", "scales")}
                    meta = json.loads((handle.metadata() or {})["sketch"])
            except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a damaged entry checks nothing
                logger.warning("replay history entry %s unreadable, skipped: %s", path, exc)
                continue
            out.append(
                (
                    path.stem,
                    DeltaSketch(
                        q=tensors["q"],
                        scales=tensors["scales"],
                        norm=float(meta["norm"]),
                        sketch_norm=float(meta["sketch_norm"]),
                        error=float(meta["error"]),
                    ),
                )
            )
        return out


def _safe(source: str) -> str:
    """A file name for a hotkey (ss58 is alphanumeric already; anything else is escaped)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in source)
