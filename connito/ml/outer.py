"""The DiLoCo outer optimizer: merge submissions' pseudo-gradients into the global selected experts.

DiLoCo (Douillard et al., 2023) and OpenDiLoCo (``train_diloco_torch.py``) treat
``global - local`` as a gradient and apply Nesterov SGD (lr 0.7, momentum 0.9) to the global
weights. This module keeps an fp32 master copy of the global selected experts and one momentum
buffer per expert tensor across cycles, and never touches anything outside those keys. With
lr 1 and momentum 0 a step is exactly the weighted average of the submissions (the test oracle).

Determinism: every operation is elementwise except the clipping norms (accumulated in float64),
so the same inputs in the same order give the same bits on the same hardware and torch build.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from connito.errors import InvalidSubmission, StateError
from connito.fsutil import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["OUTER_STATE_SCHEMA_VERSION", "OuterState", "OuterOptimizer", "clip_pseudo_gradients"]

OUTER_STATE_SCHEMA_VERSION = 1
_MASTER = "master/"
_MOMENTUM = "momentum/"
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class OuterState:
    """Everything the outer optimizer must carry across a restart (tensors are fp32 copies)."""

    master: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]  # dtype of the published global state per key
    step: int


def clip_pseudo_gradients(
    pseudo_gradients: Sequence[Mapping[str, torch.Tensor]], clip_norm: float
) -> list[dict[str, torch.Tensor]]:
    """Scale each pseudo-gradient so its global L2 norm is at most ``clip_norm`` x the median norm.

    The bound is relative because pseudo-gradient scale changes with the inner lr, the number of
    inner steps and the cycle; an absolute cap would need retuning for each. The median is the
    lower median (``torch.median``): with two submissions it is the smaller norm, so a single
    submission inflated 1000x cannot move the bound. Norms span all keys of a submission and are
    accumulated in float64.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norms = [_global_norm(pg) for pg in pseudo_gradients]
    median = float(torch.tensor(norms, dtype=torch.float64).median())
    bound = clip_norm * median
    clipped: list[dict[str, torch.Tensor]] = []
    for pg, norm in zip(pseudo_gradients, norms, strict=True):
        if norm <= bound or norm == 0.0:
            clipped.append(dict(pg))
            continue
        scale = torch.tensor(bound / norm, dtype=torch.float32)
        clipped.append({key: tensor * scale.to(tensor.device) for key, tensor in pg.items()})
        logger.debug("pseudo-gradient clipped norm=%.6g bound=%.6g", norm, bound)
    return clipped


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    squares = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors.values())
    return math.sqrt(squares)


class OuterOptimizer:
    """Nesterov SGD over the pseudo-gradients of the selected experts, with an fp32 master copy.

    The keys of ``global_state`` (canonical expert keys of the selection) are the only tensors the
    optimizer knows; every submission must carry exactly these keys with the same shapes. Tensors
    stay on the device of ``global_state``.
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        if not global_state:
            raise ValueError("global_state is empty")
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr} momentum={momentum}")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.step_count = 0
        self._dtypes = {key: global_state[key].dtype for key in sorted(global_state)}
        for key, dtype in self._dtypes.items():
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"{key}: dtype {dtype} is not a float dtype ({', '.join(_DTYPES)})")
        self._master = {key: global_state[key].detach().to(torch.float32, copy=True) for key in self._dtypes}
        self._momentum = {key: torch.zeros_like(master) for key, master in self._master.items()}

    @property
    def keys(self) -> list[str]:
        """The canonical expert keys this optimizer merges, sorted."""
        return list(self._dtypes)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The published global state: the master rounded to each key's original dtype (copies)."""
        return {key: master.to(self._dtypes[key], copy=True) for key, master in self._master.items()}

    def step(
        self,
        submissions: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float] | None = None,
        *,
        clip_norm: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merge ``submissions`` (local expert states) into the global state; return the new one.

        pseudo_gradient_i = global - local_i, in fp32, where ``global`` is the published state the
        miners started from (the master rounded to the original dtype, so the master's extra
        precision is not mistaken for a training delta). Optionally clip (``clip_pseudo_gradients``),
        average with ``weights`` normalised to sum 1 (uniform by default), then one Nesterov SGD step
        on the master. Submissions are summed in the given order: pass them in a canonical order.
        Every submission counts for every key, so experts a miner left untouched dilute the average
        (plain DiLoCo averaging; the scorer decides who is merged, not this step).

        Raises:
            ValueError: no submissions, bad weights, or a submission's keys/shapes differ.
            InvalidSubmission: ``non_finite`` if a pseudo-gradient or the merged global overflows;
                the optimizer state is then unchanged.
        """
        normalised = self._normalise(weights, len(submissions))
        pseudo_gradients = [self._pseudo_gradient(local, index) for index, local in enumerate(submissions)]
        if clip_norm is not None:
            pseudo_gradients = clip_pseudo_gradients(pseudo_gradients, clip_norm)
        stepped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in self._master:
            averaged = torch.zeros_like(self._master[key])
            for weight, pg in zip(normalised, pseudo_gradients, strict=True):
                averaged.add_(pg[key], alpha=weight)
            stepped[key] = self._sgd_step(key, averaged)
            if not bool(torch.isfinite(stepped[key][1]).all()):
                raise InvalidSubmission("non_finite", "the merged global overflows", key=key)
        for key, (buffer, master) in stepped.items():  # commit only once every key stepped cleanly
            self._momentum[key], self._master[key] = buffer, master
        self.step_count += 1
        logger.info(
            "outer step step=%d submissions=%d lr=%s momentum=%s",
            self.step_count,
            len(submissions),
            self.lr,
            self.momentum,
        )
        return self.global_state()

    def _normalise(self, weights: Sequence[float] | None, count: int) -> list[float]:
        if count == 0:
            raise ValueError("outer step needs at least one submission")
        if weights is None:
            return [1.0 / count] * count
        if len(weights) != count or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be {count} finite non-negative numbers with a positive sum")
        total = math.fsum(weights)
        return [w / total for w in weights]

    def _pseudo_gradient(self, local: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        if sorted(local) != self.keys:
            missing, extra = sorted(set(self.keys) - set(local)), sorted(set(local) - set(self.keys))
            raise ValueError(
                f"submission {index}: keys differ from the global state (missing={missing[:3]} extra={extra[:3]})"
            )
        pseudo_gradient: dict[str, torch.Tensor] = {}
        for key, master in self._master.items():
            if local[key].shape != master.shape:
                raise ValueError(
                    f"submission {index}: {key}: shape {tuple(local[key].shape)}, expected {tuple(master.shape)}"
                )
            published = master.to(self._dtypes[key]).to(torch.float32)
            delta = published - local[key].to(device=master.device, dtype=torch.float32)
            if not bool(torch.isfinite(delta).all()):
                raise InvalidSubmission(
                    "non_finite", f"submission {index}: pseudo-gradient is not finite", key=key
                )
            pseudo_gradient[key] = delta
        return pseudo_gradient

    def _sgd_step(self, key: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step with (Nesterov) momentum, as torch.optim.SGD computes it (bit for bit).

        b_t = mu * b_{t-1} + g_t            (b_0 = 0, so b_1 = g_1 as torch's first step)
        update = g_t + mu * b_t if nesterov else b_t
        master_t = master_{t-1} - lr * update
        (Sutskever et al., 2013, in PyTorch's formulation; see ``torch.optim.SGD``.)
        Returns the new ``(b_t, master_t)`` without touching the stored ones.
        """
        buffer = self._momentum[key].mul(self.momentum).add_(grad)
        update = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
        return buffer, self._master[key].add(update, alpha=-self.lr)

    def state_dict(self) -> OuterState:
        """Copies of the master, momentum, dtypes and step count."""
        return OuterState(
            master={key: t.clone() for key, t in self._master.items()},
            momentum={key: t.clone() for key, t in self._momentum.items()},
            dtypes=dict(self._dtypes),
            step=self.step_count,
        )

    def load_state_dict(self, state: OuterState) -> None:
        """Restore a state saved from an optimizer over the same keys and shapes.

        The hyperparameters stay those given to the constructor (they come from the domain config).

        Raises:
            StateError: the keys, shapes or dtypes do not match this optimizer.
        """
        for name, tensors in (("master", state.master), ("momentum", state.momentum)):
            if sorted(tensors) != self.keys:
                raise StateError(f"outer state: {name} keys differ from the global state's")
            for key, tensor in tensors.items():
                if tensor.shape != self._master[key].shape or tensor.dtype != torch.float32:
                    raise StateError(
                        f"outer state: {name} {key}: {tuple(tensor.shape)} {tensor.dtype}, expected fp32 {tuple(self._master[key].shape)}"
                    )
        if state.dtypes != self._dtypes:
            raise StateError("outer state: global dtypes differ from the global state's")
        device = next(iter(self._master.values())).device
        self._master = {key: state.master[key].to(device, copy=True) for key in self.keys}
        self._momentum = {key: state.momentum[key].to(device, copy=True) for key in self.keys}
        self.step_count = state.step

    def save(self, path: str | Path) -> None:
        """Write master and momentum as one safetensors file, atomically (crash-safe across cycles)."""
        state = self.state_dict()
        tensors = {_MASTER + key: t.to("cpu").contiguous() for key, t in state.master.items()}
        tensors.update({_MOMENTUM + key: t.to("cpu").contiguous() for key, t in state.momentum.items()})
        metadata = {
            "schema_version": str(OUTER_STATE_SCHEMA_VERSION),
            "step": str(state.step),
            "dtypes": json.dumps({key: _DTYPE_NAMES[dtype] for key, dtype in state.dtypes.items()}),
            "lr": repr(self.lr),
            "momentum": repr(self.momentum),
            "nesterov": str(self.nesterov),
        }
        atomic_write(path, safetensors.torch.save(tensors, metadata=metadata))
        logger.info("outer state saved path=%s step=%d keys=%d", path, state.step, len(state.master))

    def load(self, path: str | Path) -> None:
        """Restore master, momentum and step from ``save``'s file (see ``load_state_dict``).

        Raises:
            StateError: the file is unreadable, from another schema, or for other keys or shapes.
        """
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise StateError(f"{path}: unreadable outer state ({type(exc).__name__}: {exc})") from None
        if metadata.get("schema_version") != str(OUTER_STATE_SCHEMA_VERSION):
            version = metadata.get("schema_version")
            raise StateError(
                f"{path}: outer state schema_version {version!r}, expected {OUTER_STATE_SCHEMA_VERSION}"
            )
        try:
            dtypes = {key: _DTYPES[name] for key, name in json.loads(metadata["dtypes"]).items()}
            step = int(metadata["step"])
        except (KeyError, ValueError, AttributeError) as exc:
            raise StateError(f"{path}: outer state metadata malformed ({type(exc).__name__})") from None
        state = OuterState(
            master={name.removeprefix(_MASTER): t for name, t in tensors.items() if name.startswith(_MASTER)},
            momentum={
                name.removeprefix(_MOMENTUM): t for name, t in tensors.items() if name.startswith(_MOMENTUM)
            },
            dtypes=dtypes,
            step=step,
        )
        self.load_state_dict(state)
        logger.info("outer state loaded path=%s step=%d keys=%d", path, step, len(state.master))
