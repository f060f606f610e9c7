"""The sparse trainer's resume state: a flat tensor dict (safetensors-ready), written and read back.

Keys: ``step``, ``rng.cpu`` (and ``rng.cuda``), and per slice ``L.tensor`` (``ExpertSlice.name``):
``index.*`` (original expert ids), ``master.*``, ``optim.<state>.*`` (AdamW state). Reading it
back restores the masters, the optimizer and the RNG bit-exactly; ``connito.ml.training``'s
``SparseTrainer.state_dict`` / ``load_state_dict`` / ``load_optimizer_moments`` use this room.

May import: connito.errors, connito.ml.expert_slices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from connito.errors import ConfigError
from connito.ml.expert_slices import ExpertSlice

__all__ = ["trainer_state", "load_slice_state", "restore_rng", "moments_fit"]


def trainer_state(
    slices: list[ExpertSlice], optimizer: torch.optim.Optimizer, *, step: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Step, RNG, and each slice's expert ids, master and optimizer state, as CPU copies."""
    state: dict[str, torch.Tensor] = {"step": torch.tensor(step, dtype=torch.int64)}
    state["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    for item in slices:
        state[f"index.{item.name}"] = torch.tensor(item.expert_ids, dtype=torch.int64)
        state[f"master.{item.name}"] = item.master.detach().cpu().clone()
        for key, value in optimizer.state.get(item.master, {}).items():
            state[f"optim.{key}.{item.name}"] = value.detach().cpu().clone()
    return state


def load_slice_state(
    slices: list[ExpertSlice], optimizer: torch.optim.Optimizer, state: Mapping[str, torch.Tensor]
) -> None:
    """Copy the masters and the optimizer state of ``state`` in (the model rows are the caller's).

    Raises:
        ConfigError: the state is for another selection or has missing or misshapen tensors.
    """
    expected = {"step", "rng.cpu", *(f"{p}.{s.name}" for s in slices for p in ("index", "master"))}
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"missing {missing[0]}", field="trainer_state")
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for position, item in enumerate(slices):
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
    optimizer.load_state_dict({"state": optim_state, "param_groups": optimizer.state_dict()["param_groups"]})


def restore_rng(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Set torch's CPU RNG (and ``device``'s CUDA RNG, when saved and on CUDA) from ``state``."""
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng.cuda"], device)


def moments_fit(slices: list[ExpertSlice], state: Mapping[str, torch.Tensor]) -> bool:
    """True when ``state`` holds AdamW moments taken over exactly these slices' experts and shapes."""
    for item in slices:
        index = state.get(f"index.{item.name}")
        if index is None or index.tolist() != list(item.expert_ids):
            return False
        moments = [v for k, v in state.items() if k.startswith("optim.") and k.endswith(f".{item.name}")]
        if not moments or any(v.dim() and v.shape != item.master.shape for v in moments):
            return False
    return True
