"""Submission payload encodings: the experts as they are (``fp``), or an int8 delta (``int8``).

``int8`` stores what the miner changed, not the weights: for every expert weight ``W`` (out, in)
trained from the global ``G``, the pseudo-gradient's negative ``D = W - G`` (fp32) is kept per
output row r as ``q[r] = round(D[r] / s[r])`` in int8 ``[-127, 127]`` with the fp32 scale
``s[r] = max|D[r]| / 127`` (0 for a row that did not move). The quantisation error is at most
``s[r] / 2`` per weight, and a delta is small next to the weight, so a bf16 payload shrinks about
2x and an fp32 one about 4x at little cost in loss.

Decoding is ``(G.float() + q.float() * s).to(G.dtype)``: elementwise, on the CPU, in that order,
so every validator decodes the same bits (the merge is recomputed and compared digest for digest).
The scale of ``...gate_proj.weight`` is stored under ``...gate_proj.weight_scale``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from connito.errors import InvalidSubmission

__all__ = [
    "ENCODINGS",
    "Encoding",
    "INT8_MAX",
    "scale_key",
    "encode_int8_delta",
    "decode_int8_delta",
    "int8_specs",
    "check_int8_payload",
]

Encoding = Literal["fp", "int8"]
ENCODINGS: tuple[str, ...] = ("fp", "int8")
INT8_MAX = 127  # symmetric: -128 is never written, and a payload holding it is refused
SCALE_SUFFIX = "_scale"
SCALE_DTYPE = torch.float32


def scale_key(key: str) -> str:
    """Where the per-row scales of expert weight ``key`` live in an int8 payload."""
    return key + SCALE_SUFFIX


def encode_int8_delta(
    experts: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``experts - base`` per weight as int8 rows with fp32 scales, on the CPU.

    Raises:
        ValueError: ``experts`` and ``base`` disagree on keys or shapes, or a weight is not 2-D.
    """
    if set(experts) != set(base):
        raise ValueError("experts and base must hold the same keys")
    payload: dict[str, torch.Tensor] = {}
    for key in sorted(experts):
        weight, reference = experts[key].detach().cpu(), base[key].detach().cpu()
        if weight.shape != reference.shape or weight.dim() != 2:
            raise ValueError(f"{key}: shape {tuple(weight.shape)} vs base {tuple(reference.shape)}, need 2-D")
        delta = weight.float() - reference.float()  # (out, in)
        scale = delta.abs().amax(dim=1) / INT8_MAX  # (out,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(delta / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        payload[key] = q.to(torch.int8).contiguous()
        payload[scale_key(key)] = scale.to(SCALE_DTYPE).contiguous()
    return payload


def decode_int8_delta(
    payload: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``base + q * scale`` per weight, in the base's dtype; deterministic (CPU, fixed op order).

    ``payload`` must already have passed ``check_int8_payload`` and the loader's shape checks.
    """
    experts: dict[str, torch.Tensor] = {}
    for key in sorted(base):
        reference = base[key].detach().cpu()
        delta = payload[key].to(torch.float32) * payload[scale_key(key)].to(torch.float32)[:, None]
        experts[key] = (reference.to(torch.float32) + delta).to(reference.dtype)
    return experts


def int8_specs(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What an int8 payload must hold for experts of these (shape, dtype): q and scale per weight."""
    payload: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, (shape, _dtype) in specs.items():
        payload[key] = (tuple(shape), torch.int8)
        payload[scale_key(key)] = ((shape[0],), SCALE_DTYPE)
    return dict(sorted(payload.items()))


def check_int8_payload(payload: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    """Refuse what the encoder never writes: a negative or non-finite scale, or a q of -128.

    Raises:
        InvalidSubmission: ``non_finite`` (a NaN or Inf scale) or ``out_of_range``.
    """
    for key in keys:
        scale = payload[scale_key(key)]
        if not bool(torch.isfinite(scale).all()):
            raise InvalidSubmission("non_finite", "scale contains NaN or Inf", key=scale_key(key))
        if bool((scale < 0).any()):
            raise InvalidSubmission("out_of_range", "negative scale", key=scale_key(key))
        if bool((payload[key] < -INT8_MAX).any()):
            raise InvalidSubmission("out_of_range", f"int8 value below -{INT8_MAX}", key=key)
