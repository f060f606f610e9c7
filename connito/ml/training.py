"""The sparse inner trainer: AdamW on the selected experts only, everything else byte-identical.

transformers 5 fuses each layer's experts into one ``(E, 2*I, H)`` / ``(E, H, I)`` tensor, and
``requires_grad`` is per tensor, so "train experts 3 and 7" cannot be said with the tensor
itself. Masking the gradient is wrong: AdamW's decoupled weight decay and its state would touch
every expert (ml-methods §4.4). Instead the whole model is frozen, and each selected slice gets
an fp32 master ``nn.Parameter`` that is the only thing the optimizer sees:

- the fused tensor's selected rows always hold ``master.to(model dtype)`` (written after every
  optimizer step, outside any autograd graph);
- a parametrization hands the expert kernel the fused tensor itself, through ``_RowsToMaster``,
  whose backward sends the selected rows of the weight gradient to the master. So the forward is
  the frozen model's own, no spliced copy of the fused tensor is kept for backward, and the full
  weight gradient lives only for one layer's backward.

The same code serves both residencies: on a ``SubsetModel`` every resident expert is selected.
After ``finish`` the parametrizations are gone and the model is a plain transformers model again.

With a ``Distributed`` group (``connito.ml.distributed``) every rank keeps identical masters and
trains on its share of each step's micro-batches; the masters' gradients are summed across ranks
before the optimizer step, so the ranks stay bit-identical and a step equals the single-process
step over the whole global batch. Under ``fsdp`` the frozen model is sharded and consumed: build
a fresh one for the next trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from torch.nn.utils import parametrize
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
    write_rows_,
)
from connito.ml.document_pools import DocumentPools
from connito.ml.moe import MoELayer, expert_key, moe_layers
from connito.ml.subset import SubsetModel, check_selection

logger = logging.getLogger(__name__)

__all__ = ["Batch", "TrainResult", "SparseTrainer"]

FUSED_TENSORS: tuple[str, ...] = ("gate_up_proj", "down_proj")
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


class _RowsToMaster(torch.autograd.Function):
    """Identity on the fused tensor; the gradient of rows ``index`` goes to ``master``.

    Valid because the fused tensor's rows ``index`` equal ``master`` cast to its dtype (the trainer
    keeps it so), which makes this the derivative of ``fused.index_put((index,), master.to(dtype))``.
    """

    @staticmethod
    def forward(ctx, master: torch.Tensor, fused: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.master_dtype = master.dtype
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index).to(ctx.master_dtype), None, None


class _Splice(nn.Module):
    """Parametrization of one fused expert tensor: trainable master rows ``index`` of it."""

    def __init__(self, index: torch.Tensor, master: nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.master = master  # (n, 2*I, H) or (n, H, I), fp32

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return _RowsToMaster.apply(self.master, fused, self.index)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Slice:
    """One trained slice: rows ``slots`` of ``experts.<tensor>`` of MoE layer ``layer``."""

    layer: int
    tensor: str  # "gate_up_proj" | "down_proj"
    experts: nn.Module
    slots: tuple[int, ...]  # rows in the fused tensor
    expert_ids: tuple[int, ...]  # original expert ids of those rows (== slots in full residency)
    master: nn.Parameter

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.tensor}"

    @property
    def fused(self) -> torch.Tensor:
        """The fused parameter itself (under the parametrization while training)."""
        experts: Any = self.experts  # parametrizations is added at run time
        if parametrize.is_parametrized(experts, self.tensor):
            return cast(torch.Tensor, experts.parametrizations[self.tensor].original)
        return cast(torch.Tensor, getattr(experts, self.tensor))


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
        self.slices = self._make_slices(selection)
        for item in self.slices:
            parametrize.register_parametrization(
                item.experts, item.tensor, _Splice(self._index(item), item.master)
            )
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

    def _make_slices(self, selection: dict[int, list[int]] | None) -> list[_Slice]:
        layers = {layer.index: layer for layer in moe_layers(self.model)}
        if self.subset is not None:
            chosen = check_selection(
                selection if selection is not None else self.subset.selection, self.subset.full_num_experts
            )
            slots = {
                layer: tuple(self.subset.slot_of(layer, e) for e in ids) for layer, ids in chosen.items()
            }
        else:
            if selection is None:
                raise ConfigError("full residency needs a selection", field="selection")
            chosen = check_selection(selection, {i: layer.num_experts for i, layer in layers.items()})
            slots = chosen
        slices = []
        for layer_index in sorted(chosen):
            layer: MoELayer = layers[layer_index]
            for tensor in FUSED_TENSORS:
                fused = getattr(layer.experts, tensor)
                index = torch.tensor(slots[layer_index], device=fused.device)
                rows = fused.detach().index_select(0, index)
                master = nn.Parameter(rows.to(device=self.device, dtype=torch.float32))
                slices.append(
                    _Slice(
                        layer=layer_index,
                        tensor=tensor,
                        experts=layer.experts,
                        slots=slots[layer_index],
                        expert_ids=chosen[layer_index],
                        master=master,
                    )
                )
        return slices

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

    @staticmethod
    def _index(item: _Slice) -> torch.Tensor:
        return torch.tensor(item.slots, device=item.master.device)

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

    def _sync_model(self) -> None:
        """Write each master, in the model dtype, into its rows of the fused tensor (or its shard)."""
        for item in self.slices:
            write_rows_(item.fused, self._index(item), item.master.detach())

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
            self._sync_model()
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
        self._sync_model()
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
        state: dict[str, torch.Tensor] = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        state["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for item in self.slices:
            state[f"index.{item.name}"] = torch.tensor(item.expert_ids, dtype=torch.int64)
            state[f"master.{item.name}"] = item.master.detach().cpu().clone()
            for key, value in self.optimizer.state.get(item.master, {}).items():
                state[f"optim.{key}.{item.name}"] = value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Resume from ``state_dict()`` output taken by a trainer with the same selection.

        Raises:
            ConfigError: the state is for another selection or has missing or misshapen tensors.
        """
        expected = {"step", "rng.cpu", *(f"{p}.{s.name}" for s in self.slices for p in ("index", "master"))}
        missing = sorted(expected - set(state))
        if missing:
            raise ConfigError(f"missing {missing[0]}", field="trainer_state")
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for position, item in enumerate(self.slices):
            if state[f"index.{item.name}"].tolist() != list(item.expert_ids):
                raise ConfigError(
                    f"{item.name}: experts {state[f'index.{item.name}'].tolist()}, expected {list(item.expert_ids)}",
                    field="trainer_state",
                )
            master = state[f"master.{item.name}"]
            if master.shape != item.master.shape:
                raise ConfigError(
                    f"master.{item.name}: shape {tuple(master.shape)}, expected {tuple(item.master.shape)}",
                    field="trainer_state",
                )
            with torch.no_grad():
                item.master.copy_(master)
            prefix, suffix = "optim.", f".{item.name}"
            entries = {
                k[len(prefix) : -len(suffix)]: v
                for k, v in state.items()
                if k.startswith(prefix) and k.endswith(suffix)
            }
            if entries:
                optim_state[position] = entries
        self.optimizer.load_state_dict(
            {"state": optim_state, "param_groups": self.optimizer.state_dict()["param_groups"]}
        )
        self._sync_model()
        self.step_count = int(state["step"])
        self._replicas_synced = not self.dist.is_distributed
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)

    def load_optimizer_moments(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Take the AdamW moments (``optim.*``) of an earlier ``state_dict()``; keep weights and step.

        A miner carries its inner optimizer state into the next cycle (as DiLoCo's workers do) while
        its weights restart from the new global. Returns False, changing nothing, when the state was
        taken over other experts or holds no moments.
        """
        for item in self.slices:
            index = state.get(f"index.{item.name}")
            if index is None or index.tolist() != list(item.expert_ids):
                return False
            moments = [v for k, v in state.items() if k.startswith("optim.") and k.endswith(f".{item.name}")]
            if not moments or any(v.dim() and v.shape != item.master.shape for v in moments):
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
            self._sync_model()
            for item in self.slices:
                parametrize.remove_parametrizations(item.experts, item.tensor, leave_parametrized=False)
            if self.cfg.gradient_checkpointing and not self._checkpointing_was_on:
                self.model.activation_checkpointing_disable()
                self.model.disable_input_require_grads()
            for name, param in self.model.named_parameters():
                param.requires_grad_(self._requires_grad.get(name, True))
            self.model.eval()
            self.optimizer.state.clear()
            self._finished = True
        return self._trained_experts()

    def _trained_experts(self) -> dict[str, torch.Tensor]:
        """Each expert from its masters cast to the model dtype: the bits its fused rows hold."""
        state: dict[str, torch.Tensor] = {}
        for item in self.slices:
            rows = item.master.detach().to(item.fused.dtype)  # (n, 2*I, H) or (n, H, I)
            for row, expert in zip(rows, item.expert_ids, strict=True):
                if item.tensor == "down_proj":
                    state[expert_key(item.layer, expert, "down_proj")] = row.clone()
                else:  # gate rows first (transformers 5 fused layout)
                    gate, up = row.chunk(2, dim=0)
                    state[expert_key(item.layer, expert, "gate_proj")] = gate.clone()
                    state[expert_key(item.layer, expert, "up_proj")] = up.clone()
        return dict(sorted(state.items()))
