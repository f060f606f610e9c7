"""The sparse inner trainer: AdamW on the selected experts only, everything else byte-identical.

The whole model is frozen; each selected slice of a fused expert tensor gets an fp32 master
``nn.Parameter``, the only thing the optimizer sees, spliced into the model so that its rows'
gradient reaches the master (``connito.ml.expert_slices`` says how and why). This room runs the
steps: micro-batches, the token loss, document-pool draws, the distributed gradient sum, and
resume (the state's format is ``connito.ml.trainer_state``'s).

The same code serves both residencies: on a ``SubsetModel`` every resident expert is selected.
After ``finish`` the parametrizations are gone and the model is a plain transformers model again.

With a ``Distributed`` group (``connito.ml.distributed``) every rank keeps identical masters and
trains on its share of each step's micro-batches; the masters' gradients are summed across ranks
before the optimizer step, so the ranks stay bit-identical and a step equals the single-process
step over the whole global batch. Under ``fsdp`` the frozen model is sharded and consumed: build
a fresh one for the next trainer.

May import: connito.config, connito.errors, connito.ml.distributed, connito.ml.document_pools,
connito.ml.expert_slices, connito.ml.subset, connito.ml.trainer_state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from connito.config import TrainingConfig
from connito.errors import ConfigError
from connito.ml.distributed import (
    Distributed,
    all_reduce_sum_,
    broadcast_,
    broadcast_object,
    shard_model,
)
from connito.ml.document_pools import DocumentPools
from connito.ml.expert_slices import (
    FUSED_TENSORS,
    make_slices,
    splice,
    trained_experts,
    unsplice,
    write_masters,
)
from connito.ml.subset import SubsetModel
from connito.ml.trainer_state import load_slice_state, moments_fit, restore_rng, trainer_state

logger = logging.getLogger(__name__)

__all__ = ["Batch", "TrainResult", "SparseTrainer"]

IGNORE_INDEX = -100

# A micro-batch: token ids (B, T), or a mapping with "input_ids" and optional "attention_mask".
Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What one ``SparseTrainer.train`` call did."""

    steps: int  # optimizer steps taken in this call
    losses: tuple[float, ...]  # mean token cross-entropy of each step
    tokens: int  # predicted tokens consumed
    wall_s: float

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def _batch_parts(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch["input_ids"], batch.get("attention_mask")


def _targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets (B, T-1); padding positions are ``IGNORE_INDEX``."""
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return targets


class SparseTrainer:
    """AdamW on the selected experts of ``model``; every other byte of the model stays as it was.

    ``model`` is a full transformers MoE (``full`` residency; ``selection`` names the experts) or a
    ``SubsetModel`` (``subset`` residency; ``selection`` defaults to all resident experts and uses
    ORIGINAL expert ids either way). The trainer owns the model until ``finish``: it freezes every
    parameter, parametrizes the fused expert tensors, and seeds torch's global RNG with ``cfg.seed``.
    ``dist`` makes it one rank of a data-parallel group (``ddp``) or also shards the frozen model
    (``fsdp``: pass the model on the CPU; its shards move to ``dist.device``).
    """

    def __init__(
        self,
        model: PreTrainedModel | SubsetModel,
        selection: dict[int, list[int]] | None,
        cfg: TrainingConfig,
        *,
        device: str | torch.device | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.cfg = cfg
        self.subset = model if isinstance(model, SubsetModel) else None
        self.model = model.model if isinstance(model, SubsetModel) else model
        if dist is not None and device is None:
            device = dist.device
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.dist = dist if dist is not None else Distributed.single(self.device)
        if not self.dist.shards_model:  # fsdp moves only each rank's shard to the device
            self.model.to(self.device)
        self.step_count = 0
        self._finished = False
        self._replicas_synced = not self.dist.is_distributed
        self._requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.requires_grad_(False)
        self.slices = make_slices(self.model, selection, subset=self.subset, device=self.device)
        splice(self.slices)
        if self.dist.shards_model:
            shard_model(self.model, self.dist, replicated={item.master for item in self.slices})
        self.optimizer = torch.optim.AdamW(
            [item.master for item in self.slices], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self._pools = self._make_pools(cfg)
        self._checkpointing_was_on = bool(self.model.is_activation_checkpointing)
        if cfg.gradient_checkpointing and not self._checkpointing_was_on:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        torch.manual_seed(cfg.seed)
        logger.info(
            "sparse trainer ready residency=%s experts=%d trainable_params=%d device=%s strategy=%s ranks=%d",
            "subset" if self.subset is not None else "full",
            sum(len(s.slots) for s in self.slices) // len(FUSED_TENSORS),
            self.trainable_params,
            self.device,
            self.dist.strategy,
            self.dist.world_size,
        )

    # -- setup -------------------------------------------------------------------------------

    def _make_pools(self, cfg: TrainingConfig) -> DocumentPools | None:
        if cfg.document_pools is None:
            return None
        if self.subset is not None:
            raise ConfigError("document pools need the full model resident", field="training.document_pools")
        try:
            return DocumentPools(self.model, cfg.document_pools, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(str(exc), field="training.document_pools") from exc

    def _pool_draws(self, position: int) -> torch.Generator:
        """The generator of the pool sizes of the step's ``position``-th micro-batch.

        A function of (seed, step, position) only: a resumed trainer draws what it would have, and
        K ranks draw for their micro-batches what one process would for the whole step.
        """
        key = hashlib.sha256(f"{self.cfg.seed}:{self.step_count}:{position}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches one optimizer step takes from the shared stream, over all ranks."""
        return self.cfg.grad_accum_steps * self.dist.world_size

    @property
    def trainable_params(self) -> int:
        """Elements the optimizer updates (the selected experts, once)."""
        return sum(item.master.numel() for item in self.slices)

    @property
    def optimizer_state_bytes(self) -> int:
        """Bytes of AdamW state tensors (exp_avg, exp_avg_sq, step); zero before the first step."""
        return sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )

    # -- training ----------------------------------------------------------------------------

    def sync_replicas(self) -> int:
        """Give every rank rank 0's masters, optimizer state and step count; return that step.

        Call after a resume: rank 0 alone decides what was resumed, so ranks that read another
        global state or no trainer state at all still train as one. A no-op in one process.
        """
        if self.dist.is_distributed:
            layout = [sorted(self.optimizer.state.get(item.master, {})) for item in self.slices]
            step_count, layout = broadcast_object((self.step_count, layout), self.dist)
            steps = [
                float(self.optimizer.state[item.master]["step"])
                if self.dist.is_main and "step" in names
                else None
                for item, names in zip(self.slices, layout, strict=True)
            ]
            steps = broadcast_object(steps, self.dist)  # AdamW's step is a CPU scalar: NCCL cannot send it
            tensors: list[torch.Tensor] = []
            for item, names, step in zip(self.slices, layout, steps, strict=True):
                state = self.optimizer.state[item.master]
                if not self.dist.is_main:
                    state.clear()  # only what rank 0 holds
                for name in names:
                    if name == "step":
                        state["step"] = torch.tensor(step, dtype=torch.float32)
                    else:  # AdamW: exp_avg, exp_avg_sq, shaped like the master
                        tensors.append(state.setdefault(name, torch.zeros_like(item.master)))
                tensors.append(item.master)
            broadcast_(tensors, self.dist)
            self.step_count = int(step_count)
            write_masters(self.slices)
        self._replicas_synced = True
        return self.step_count

    def _micro_batches(self, batch: Batch | Sequence[Batch]) -> list[Batch]:
        if isinstance(batch, (list, tuple)):
            micro = cast(list[Batch], list(batch))
        else:
            micro = [cast(Batch, batch)]
        if len(micro) != self.cfg.grad_accum_steps:
            raise ConfigError(
                f"one step needs grad_accum_steps={self.cfg.grad_accum_steps} micro-batches, got {len(micro)}",
                field="training.grad_accum_steps",
            )
        return micro

    def _loss_sum(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Summed next-token cross-entropy (no router aux loss; bf16 autocast on CUDA only).

        Targets are shifted rather than logits, so the (B, T, V) logits are never copied.
        """
        with torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = F.pad(_targets(input_ids, attention_mask), (0, 1), value=IGNORE_INDEX)  # (B, T)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def step(self, batch: Batch | Sequence[Batch]) -> float:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its mean token loss.

        ``batch`` is one micro-batch when ``grad_accum_steps == 1``, else a list of exactly that
        many. The loss is averaged over all predicted tokens of the step (sum, divide once).

        Raises:
            ConfigError: wrong number of micro-batches, or the trainer is finished.
        """
        if self._finished:
            raise ConfigError("the trainer is finished; build a new one", field="trainer")
        if not self._replicas_synced:
            self.sync_replicas()
        micro = [send_to_device(_batch_parts(b), self.device) for b in self._micro_batches(batch)]
        tokens = self._global_tokens(
            sum(int((_targets(ids, mask) != IGNORE_INDEX).sum()) for ids, mask in micro)
        )
        self.model.train()
        loss_total = 0.0
        with self._pools or contextlib.nullcontext():
            for index, (input_ids, attention_mask) in enumerate(micro):
                if self._pools is not None:
                    # this rank's index-th micro-batch is the step's (rank + index * world)-th (train)
                    position = self.dist.rank + index * self.dist.world_size
                    self._pools.draw(input_ids.shape[0], generator=self._pool_draws(position))
                loss_sum = self._loss_sum(input_ids, attention_mask)
                (loss_sum / max(tokens, 1)).backward()
                loss_total += float(loss_sum.detach())
        masters = [item.master for item in self.slices]
        if self.dist.is_distributed:
            loss_total = self._sum_over_ranks(masters, loss_total)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(masters, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        write_masters(self.slices)
        self.step_count += 1
        loss = loss_total / max(tokens, 1)
        logger.debug("inner step=%d loss=%.4f tokens=%d", self.step_count, loss, tokens)
        return loss

    def _sum_over_ranks(self, masters: list[nn.Parameter], loss_total: float) -> float:
        """Sum the masters' gradients and the step's loss over every rank's share, in one all-reduce."""
        for master in masters:
            if master.grad is None:  # every rank must send the same layout
                master.grad = torch.zeros_like(master)
        loss = torch.tensor([loss_total], dtype=torch.float32, device=self.device)
        all_reduce_sum_([*(m.grad for m in masters if m.grad is not None), loss], self.dist)
        return float(loss.item())

    def _global_tokens(self, local_tokens: int) -> int:
        """Predicted tokens of the whole step over all ranks: the one divisor of every rank's loss."""
        if not self.dist.is_distributed:
            return local_tokens
        count = torch.tensor([local_tokens], dtype=torch.int64, device=self.device)
        all_reduce_sum_([count], self.dist)
        return int(count.item())

    def train(self, batches: Iterable[Batch], steps: int, *, progress: bool = True) -> TrainResult:
        """Up to ``steps`` optimizer steps, taking ``micro_batches_per_step`` micro-batches each.

        Every rank reads the same ``batches`` stream; rank r trains on micro-batches r, r+K, ... of
        each step, so K ranks see K times the tokens of one per step. Stops early, without a
        partial step, when ``batches`` runs out. ``tokens`` counts all ranks' tokens.
        """
        iterator = iter(batches)
        losses: list[float] = []
        tokens = 0
        start = time.perf_counter()
        bar = tqdm(
            total=steps, disable=not progress or not self.dist.is_main, desc="inner steps", unit="step"
        )
        per_step = self.micro_batches_per_step
        for _ in range(steps):
            micro = [b for _, b in zip(range(per_step), iterator, strict=False)]
            if len(micro) < per_step:
                logger.warning("training data ran out step=%d of=%d", len(losses), steps)
                break
            tokens += sum(int((_targets(*_batch_parts(b)) != IGNORE_INDEX).sum()) for b in micro)
            mine = micro[self.dist.rank :: self.dist.world_size]
            losses.append(self.step(mine if len(mine) > 1 else mine[0]))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        return TrainResult(
            steps=len(losses), losses=tuple(losses), tokens=tokens, wall_s=time.perf_counter() - start
        )

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume bit-exactly, as a flat tensor dict (safetensors-ready).

        Keys: ``step``, ``rng.cpu`` (and ``rng.cuda``), and per slice ``L.tensor``:
        ``index.*`` (original expert ids), ``master.*``, ``optim.<state>.*`` (AdamW state).
        """
        return trainer_state(self.slices, self.optimizer, step=self.step_count, device=self.device)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Resume from ``state_dict()`` output taken by a trainer with the same selection.

        Raises:
            ConfigError: the state is for another selection or has missing or misshapen tensors.
        """
        load_slice_state(self.slices, self.optimizer, state)
        write_masters(self.slices)
        self.step_count = int(state["step"])
        self._replicas_synced = not self.dist.is_distributed
        restore_rng(state, self.device)

    def load_optimizer_moments(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Take the AdamW moments (``optim.*``) of an earlier ``state_dict()``; keep weights and step.

        A miner carries its inner optimizer state into the next cycle (as DiLoCo's workers do) while
        its weights restart from the new global. Returns False, changing nothing, when the state was
        taken over other experts or holds no moments.
        """
        if not moments_fit(self.slices, state):
            return False
        current = self.state_dict()
        current.update({key: value for key, value in state.items() if key.startswith("optim.")})
        self.load_state_dict(current)
        return True

    # -- finish ------------------------------------------------------------------------------

    def finish(self) -> dict[str, torch.Tensor]:
        """Leave a plain model holding the trained experts; return them under canonical keys.

        Keys use ORIGINAL expert ids (also for a subset model); tensors are copies in the model
        dtype. Afterwards the model has no parametrizations, its state-dict keys are the original
        ones and its ``requires_grad`` flags are restored. Under ``fsdp`` the sharded model is
        left as it is, to be dropped: only the returned experts are meant to outlive the trainer.
        """
        if not self._finished and self.dist.shards_model:
            self.optimizer.state.clear()
            self._finished = True
        if not self._finished:
            write_masters(self.slices)
            unsplice(self.slices)
            if self.cfg.gradient_checkpointing and not self._checkpointing_was_on:
                self.model.activation_checkpointing_disable()
                self.model.disable_input_require_grads()
            for name, param in self.model.named_parameters():
                param.requires_grad_(self._requires_grad.get(name, True))
            self.model.eval()
            self.optimizer.state.clear()
            self._finished = True
        return trained_experts(self.slices)
