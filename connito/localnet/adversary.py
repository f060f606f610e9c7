"""Adversarial miners for the localnet: each runs the real miner loop but cheats in one way.

- ``copy``: a sybil that obtained an honest miner's checkpoint out of band and commits the same
  tensors under its own hotkey, after the honest commitment (identical payloads: the later
  commitment must lose).
- ``nan``: the global experts with a NaN written into one tensor.
- ``lazy``: the global experts re-uploaded unchanged.
- ``stale``: trains from an old global revision (the one before the latest; in the first cycle a
  perturbed copy of the base experts) and says so in its manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from connito.chain.base import Commitment
from connito.errors import CommitmentDecodeError
from connito.node.miner import Miner
from connito.protocol.checkpoint import EXPERTS_FILE
from connito.protocol.commitments import CommitPayload, decode_commitment
from connito.protocol.global_state import GlobalState
from connito.protocol.merge import state_revision

logger = logging.getLogger(__name__)

__all__ = ["ADVERSARY_KINDS", "AdversaryMiner"]

ADVERSARY_KINDS = ("copy", "nan", "lazy", "stale")


@dataclass
class AdversaryMiner(Miner):
    kind: str = "lazy"
    victim_workdir: Path | None = None
    victim_hotkey: str | None = None
    _previous_global: GlobalState | None = None
    _pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def pull_global(self, cycle: int) -> None:
        before = self.global_state
        super().pull_global(cycle)
        if before is not None and before.revision != (
            self.global_state.revision if self.global_state else ""
        ):
            self._previous_global = before

    def produce_experts(self, cycle: int) -> dict[str, torch.Tensor] | None:
        assert self.global_state is not None
        experts = {k: v.clone() for k, v in self.global_state.experts.items()}
        if self.kind == "lazy":
            return experts
        if self.kind == "nan":
            first = sorted(experts)[0]
            experts[first].view(-1)[0] = float("nan")
            return experts
        if self.kind == "stale":
            return self._stale(cycle)
        if self.kind == "copy":
            return self._copy(cycle)
        raise ValueError(f"unknown adversary kind {self.kind!r}")

    def _stale(self, cycle: int) -> dict[str, torch.Tensor]:
        assert self.global_state is not None
        if self._previous_global is not None and self._previous_global.revision != self.global_state.revision:
            old = {k: v.clone() for k, v in self._previous_global.experts.items()}
        else:
            generator = torch.Generator().manual_seed(cycle)
            old = {
                k: v + 1e-3 * torch.randn(v.shape, generator=generator).to(v.dtype)
                for k, v in self.global_state.experts.items()
            }
        self.progress = self.progress.model_copy(update={"global_revision": state_revision(old)})
        # a little real training on the old experts, so the submission is not merely lazy
        for key, tensor in old.items():
            generator = torch.Generator().manual_seed(hash(key) % 2**31)
            tensor.add_(1e-3 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        return old

    def _copy(self, cycle: int) -> dict[str, torch.Tensor] | None:
        if self.victim_workdir is None:
            raise ValueError("copy adversary needs victim_workdir")
        source = self.victim_workdir / "checkpoints" / str(cycle) / EXPERTS_FILE
        if not source.exists():
            return None  # the victim has not finished yet: try again next block
        return load_file(str(source))

    def commit(self, cycle: int) -> None:
        if self.kind == "copy" and not self._victim_committed_before_now(cycle):
            return
        super().commit(cycle)

    def _victim_committed_before_now(self, cycle: int) -> bool:
        block = self.ctx.chain.current_block()
        for commitment in self.ctx.chain.commitments():
            if commitment.hotkey == self.victim_hotkey and _is_commit(commitment, cycle):
                return commitment.block < block
        return False


def _is_commit(commitment: Commitment, cycle: int) -> bool:
    try:
        payload = decode_commitment(commitment.data)
    except CommitmentDecodeError:
        return False
    return isinstance(payload, CommitPayload) and payload.cycle == cycle
