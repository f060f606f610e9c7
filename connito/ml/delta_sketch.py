"""A compact sketch of a pseudo-gradient that bounds its cosine with another one from above.

The copy screen compares every submission's pseudo-gradient with every earlier kept one. Holding
those fp32 vectors makes a validator's memory grow by a whole payload per submission; a sketch
holds one byte per element instead: the delta quantized to int8 with one fp64 scale per block of
``SKETCH_BLOCK`` elements, plus its exact norm and the exact norm of the quantization error.
From two sketches, Cauchy-Schwarz gives a guaranteed upper bound on the real cosine of the two
deltas (``cosine_upper_bound``). Only a pair whose bound reaches the duplicate threshold needs
the exact fp32 cosine, so the screen reads a kept submission's experts again only for near-copies
and decides exactly as comparing the full vectors would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SKETCH_BLOCK", "DeltaSketch", "sketch_delta", "cosine_upper_bound", "cosine_estimate"]

# 127^2 * 1024 < 2^24: every partial sum of a block's int8 products is an integer an fp32
# accumulator holds exactly, whatever order the reduction adds them in.
SKETCH_BLOCK = 1024
_CHUNK_BLOCKS = 1024  # blocks handled per step: bounds the scratch tensors to a few MiB


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaSketch:
    """``delta ~ q * scale`` per block, with ``norm = |delta|`` and ``error = |delta - q * scale|``."""

    q: torch.Tensor  # (blocks, SKETCH_BLOCK) int8, zero-padded
    scales: torch.Tensor  # (blocks,) float64
    norm: float
    sketch_norm: float  # |q * scale|
    error: float

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()


def sketch_delta(delta: torch.Tensor) -> DeltaSketch:
    """Quantize a flat, finite delta to int8 per block and measure exactly what that lost (in fp64)."""
    flat = delta.detach().reshape(-1)
    blocks = max(1, math.ceil(flat.numel() / SKETCH_BLOCK))
    q = torch.zeros(blocks, SKETCH_BLOCK, dtype=torch.int8)
    scales = torch.zeros(blocks, dtype=torch.float64)
    norm_sq = sketch_sq = error_sq = 0.0
    for first in range(0, blocks, _CHUNK_BLOCKS):
        last = min(blocks, first + _CHUNK_BLOCKS)
        part = flat[first * SKETCH_BLOCK : last * SKETCH_BLOCK].to(torch.float64)
        part = torch.nn.functional.pad(part, (0, (last - first) * SKETCH_BLOCK - part.numel()))
        part = part.view(last - first, SKETCH_BLOCK)
        scale = part.abs().amax(dim=1) / 127.0
        codes = torch.round(part / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).clamp_(-127, 127)
        approx = codes * scale.unsqueeze(1)
        q[first:last] = codes.to(torch.int8)
        scales[first:last] = scale
        norm_sq += float(part.square().sum())
        sketch_sq += float(approx.square().sum())
        error_sq += float((part - approx).square().sum())
    return DeltaSketch(
        q=q,
        scales=scales,
        norm=math.sqrt(norm_sq),
        sketch_norm=math.sqrt(sketch_sq),
        error=math.sqrt(error_sq),
    )


def cosine_upper_bound(a: DeltaSketch, b: DeltaSketch) -> float:
    """An upper bound on the real cosine of the two deltas the sketches were made from.

    With ``a = ra + ea`` and ``b = rb + eb`` (sketch plus error),
    ``a.b <= ra.rb + |ra||eb| + |ea||rb| + |ea||eb|`` by Cauchy-Schwarz. ``ra.rb`` is exact: the
    per-block int8 dot products are integers below 2^24, summed in fp32 without rounding, then
    scaled in fp64. Returns ``inf`` for a zero delta (no bound).
    """
    if a.q.shape != b.q.shape:
        raise ValueError(f"sketches of different lengths: {tuple(a.q.shape)} and {tuple(b.q.shape)}")
    if a.norm == 0.0 or b.norm == 0.0:
        return math.inf
    sketch_dot = _sketch_dot(a, b)
    slack = a.sketch_norm * b.error + a.error * b.sketch_norm + a.error * b.error
    return (sketch_dot + slack) / (a.norm * b.norm)


def cosine_estimate(a: DeltaSketch, b: DeltaSketch) -> float:
    """The cosine of the two quantised deltas: within about ``error / norm`` of the real one.

    For history checks (``connito.protocol.replay``), where only sketches of old deltas are kept.
    Returns 0 for a zero delta and for sketches of different lengths (different selections).
    """
    if a.q.shape != b.q.shape or a.sketch_norm == 0.0 or b.sketch_norm == 0.0:
        return 0.0
    return _sketch_dot(a, b) / (a.sketch_norm * b.sketch_norm)


def _sketch_dot(a: DeltaSketch, b: DeltaSketch) -> float:
    """``ra . rb`` exactly: int8 block products summed in fp32 (exact below 2^24), scaled in fp64."""
    dot = 0.0
    for first in range(0, a.q.shape[0], _CHUNK_BLOCKS):
        rows = slice(first, first + _CHUNK_BLOCKS)
        block_dots = (a.q[rows].to(torch.float32) * b.q[rows].to(torch.float32)).sum(dim=1)
        dot += float((block_dots.to(torch.float64) * a.scales[rows] * b.scales[rows]).sum())
    return dot
