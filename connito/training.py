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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from connito.config import TrainingConfig
from connito.errors import ConfigError
from connito.moe import MoELayer, expert_key, moe_layers, read_expert
from connito.subset import SubsetModel, check_selection

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
        if parametrize.is_parametrized(self.experts, self.tensor):
            return self.experts.parametrizations[self.tensor].original
        return getattr(self.experts, self.tensor)


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
    """

    def __init__(
        self,
        model: PreTrainedModel | SubsetModel,
        selection: dict[int, list[int]] | None,
        cfg: TrainingConfig,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.subset = model if isinstance(model, SubsetModel) else None
        self.model = model.model if isinstance(model, SubsetModel) else model
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.model.to(self.device)
        self.step_count = 0
        self._finished = False
        self._requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.requires_grad_(False)
        self.slices = self._make_slices(selection)
        for item in self.slices:
            parametrize.register_parametrization(
                item.experts, item.tensor, _Splice(self._index(item), item.master)
            )
        self.optimizer = torch.optim.AdamW(
            [item.master for item in self.slices], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self._checkpointing_was_on = bool(self.model.is_activation_checkpointing)
        if cfg.gradient_checkpointing and not self._checkpointing_was_on:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        torch.manual_seed(cfg.seed)
        logger.info(
            "sparse trainer ready residency=%s experts=%d trainable_params=%d device=%s",
            "subset" if self.subset is not None else "full",
            sum(len(s.slots) for s in self.slices) // len(FUSED_TENSORS),
            self.trainable_params,
            self.device,
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
                master = nn.Parameter(fused.detach().index_select(0, index).to(torch.float32))
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

    @staticmethod
    def _index(item: _Slice) -> torch.Tensor:
        return torch.tensor(item.slots, device=item.master.device)

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
        """Write each master, in the model dtype, into its rows of the fused tensor."""
        with torch.no_grad():
            for item in self.slices:
                fused = item.fused
                fused.index_copy_(0, self._index(item).to(fused.device), item.master.to(fused.dtype))

    def _micro_batches(self, batch: Batch | Sequence[Batch]) -> list[Batch]:
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
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
        micro = [send_to_device(_batch_parts(b), self.device) for b in self._micro_batches(batch)]
        tokens = sum(int((_targets(ids, mask) != IGNORE_INDEX).sum()) for ids, mask in micro)
        self.model.train()
        loss_total = 0.0
        for input_ids, attention_mask in micro:
            loss_sum = self._loss_sum(input_ids, attention_mask)
            (loss_sum / max(tokens, 1)).backward()
            loss_total += float(loss_sum.detach())
        masters = [item.master for item in self.slices]
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(masters, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync_model()
        self.step_count += 1
        loss = loss_total / max(tokens, 1)
        logger.debug("inner step=%d loss=%.4f tokens=%d", self.step_count, loss, tokens)
        return loss

    def train(self, batches: Iterable[Batch], steps: int, *, progress: bool = True) -> TrainResult:
        """Up to ``steps`` optimizer steps, taking ``grad_accum_steps`` micro-batches each.

        Stops early, without a partial step, when ``batches`` runs out.
        """
        iterator = iter(batches)
        losses: list[float] = []
        tokens = 0
        start = time.perf_counter()
        bar = tqdm(total=steps, disable=not progress, desc="inner steps", unit="step")
        for _ in range(steps):
            micro = [b for _, b in zip(range(self.cfg.grad_accum_steps), iterator, strict=False)]
            if len(micro) < self.cfg.grad_accum_steps:
                logger.warning("training data ran out step=%d of=%d", len(losses), steps)
                break
            tokens += sum(int((_targets(*_batch_parts(b)) != IGNORE_INDEX).sum()) for b in micro)
            losses.append(self.step(micro))
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
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)

    # -- finish ------------------------------------------------------------------------------

    def finish(self) -> dict[str, torch.Tensor]:
        """Leave a plain model holding the trained experts; return them under canonical keys.

        Keys use ORIGINAL expert ids (also for a subset model); tensors are copies in the model
        dtype. Afterwards the model has no parametrizations, its state-dict keys are the original
        ones and its ``requires_grad`` flags are restored.
        """
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
        layers = {layer.index: layer for layer in moe_layers(self.model)}
        state: dict[str, torch.Tensor] = {}
        for item in self.slices:
            if item.tensor != FUSED_TENSORS[0]:
                continue  # one pass per layer: read_expert returns all three projections
            for slot, expert in zip(item.slots, item.expert_ids, strict=True):
                for projection, tensor in read_expert(layers[item.layer], slot).items():
                    state[expert_key(item.layer, expert, projection)] = tensor
        return state
