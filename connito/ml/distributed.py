"""Several processes training one miner's experts: process group, gradient sum, FSDP sharding.

A miner launched with ``accelerate launch --num_processes K neurons/miner.py ...`` (or torchrun)
runs K copies of itself, one per GPU. accelerate's ``PartialState`` reads the launcher's
environment, opens the process group (NCCL on GPUs, gloo on CPUs) and picks each rank's device.
Every rank then holds the same trainable fp32 masters of the selected experts (the trainer in
``connito.ml.training`` keeps them) and sees its own share of each optimizer step's micro-batches;
this module supplies the collectives that keep the ranks one trainer:

- ``ddp``: the model is replicated; after the backward of a step the masters' gradients are
  summed across ranks in one coalesced all-reduce. This is DistributedDataParallel's math
  without its module wrapper: the trainable tensors hide under parametrizations (and under FSDP
  outside the sharded parameters), and one sum per optimizer step, whatever ``grad_accum_steps``,
  is all they need. Each rank divides by the global token count, so the summed gradient is the
  single-process gradient of the whole step.
- ``fsdp``: as ``ddp`` for the masters, and the frozen model itself (attention, routers, every
  expert) is sharded with FSDP2 ``fully_shard`` per decoder layer, so a full-residency model that
  does not fit one GPU fits K. The masters stay replicated (they are ``ignored_params``).

Frozen weights never get a gradient buffer in either mode: only masters require grad.
Rank 0 alone speaks for the hotkey (checkpoint, commit, reveal); ``main_decides`` makes every
other choice that could split the ranks (stop early, resume step) rank 0's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor

from connito.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "Distributed",
    "init_distributed",
    "all_reduce_sum_",
    "broadcast_",
    "broadcast_object",
    "barrier",
    "main_decides",
    "shard_model",
    "is_sharded",
    "write_rows_",
]

Strategy = Literal["single", "ddp", "fsdp"]
T = TypeVar("T")
STRATEGIES: tuple[str, ...] = ("auto", "single", "ddp", "fsdp")


@dataclass(frozen=True, slots=True, kw_only=True)
class Distributed:
    """Where this process sits in the group: rank, group size, device and strategy."""

    strategy: Strategy
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Distributed:
        """One process, no process group: every collective below is a no-op."""
        return cls(strategy="single", rank=0, world_size=1, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shards_model(self) -> bool:
        return self.strategy == "fsdp" and self.is_distributed


def init_distributed(strategy: str = "auto", *, device: str = "auto") -> Distributed:
    """Join the process group a launcher set up (accelerate launch, torchrun), or run alone.

    ``auto`` is ``ddp`` when launched with several processes, else ``single``; any strategy in
    one process is ``single`` (there is nothing to reduce or shard). Under a launcher each rank's
    device comes from accelerate (``cuda:LOCAL_RANK``); ``device="cpu"`` forces the gloo backend
    on CPUs (tests, debugging). Alone, ``device`` is honoured as given (``auto``: accelerate's).

    Raises:
        ConfigError: an unknown strategy, or ``single`` with several processes.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}", field="--training.strategy"
        )
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    world = int(state.num_processes)
    resolved = cast(Strategy, strategy if strategy != "auto" else ("ddp" if world > 1 else "single"))
    if resolved == "single" and world > 1:
        raise ConfigError(
            f"launched with {world} processes: pass --training.strategy ddp or fsdp",
            field="--training.strategy",
        )
    if world == 1:
        return Distributed.single(state.device if device == "auto" else device)
    chosen = torch.device("cpu") if state.device.type == "cpu" else torch.device(state.device)
    logger.info(
        "process group joined strategy=%s rank=%d world=%d backend=%s device=%s",
        resolved, state.process_index, world, state.backend, chosen,
    )  # fmt: skip
    return Distributed(strategy=resolved, rank=int(state.process_index), world_size=world, device=chosen)


def all_reduce_sum_(tensors: Sequence[torch.Tensor], dist: Distributed) -> None:
    """Sum each tensor over all ranks, in place, in one collective (flatten, reduce, copy back).

    The tensors share one dtype (fp32 gradients and losses; int64 token counts).
    """
    if not dist.is_distributed or not tensors:
        return
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"one all-reduce sums one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.detach().copy_(flat[offset : offset + count].view_as(tensor))
        offset += count


def broadcast_(tensors: Sequence[torch.Tensor], dist: Distributed) -> None:
    """Overwrite each tensor with rank 0's, in place."""
    if not dist.is_distributed:
        return
    for tensor in tensors:
        torch_dist.broadcast(tensor.detach(), src=0)


def broadcast_object(value: T, dist: Distributed) -> T:
    """Rank 0's ``value`` on every rank (small picklable values only: flags, counts, layouts)."""
    if not dist.is_distributed:
        return value
    box: list[T] = [value]
    torch_dist.broadcast_object_list(box, src=0, device=dist.device if dist.device.type == "cuda" else None)
    return box[0]


def barrier(dist: Distributed) -> None:
    """Wait until every rank gets here (e.g. all have finished writing a shared folder)."""
    if dist.is_distributed:
        torch_dist.barrier()


def main_decides(flag: bool, dist: Distributed) -> bool:
    """Rank 0's decision on every rank, so a choice read from the clock or chain never splits them."""
    return bool(broadcast_object(bool(flag), dist))


def shard_model(model: nn.Module, dist: Distributed, *, replicated: set[nn.Parameter]) -> None:
    """FSDP2-shard ``model`` in place over all ranks: each decoder layer, then the root.

    ``replicated`` parameters (the trainer's masters) are left out: every rank keeps all of them.
    Parameters are sharded along dim 0, so a fused ``(E, 2*I, H)`` expert tensor puts experts
    ``[r*ceil(E/K), ...)`` on rank r; ``write_rows_`` relies on that layout.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    inner = getattr(model, "model", model)
    for layer in getattr(inner, "layers", []):
        fully_shard(layer, mesh=mesh, ignored_params=replicated)
    fully_shard(model, mesh=mesh, ignored_params=replicated)
    logger.info("model sharded fsdp ranks=%d layers=%d", dist.world_size, len(getattr(inner, "layers", [])))


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def write_rows_(fused: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``fused[index] = rows`` (dim 0), also when ``fused`` is an FSDP shard of the full tensor.

    A sharded tensor is written in its local shard only: rank r holds global rows
    ``[r*chunk, r*chunk + local_rows)`` with ``chunk = ceil(rows / world)`` (``torch.chunk``).
    Every rank holds all ``rows`` (replicated masters), so together they write every row.
    """
    with torch.no_grad():
        if not is_sharded(fused):
            fused.index_copy_(0, index.to(fused.device), rows.to(fused.dtype))
            return
        sharded = cast(DTensor, fused)
        local = sharded.to_local()
        mesh = sharded.device_mesh
        chunk = math.ceil(fused.shape[0] / mesh.size())
        start = min(mesh.get_local_rank() * chunk, fused.shape[0])
        index = index.to(local.device)
        mine = (index >= start) & (index < start + local.shape[0])
        if bool(mine.any()):
            local.index_copy_(0, index[mine] - start, rows.to(local.device, local.dtype)[mine])
