"""The expert-subset model a miner trains in ``subset`` residency, and its merge back.

A subset model is the base model with, in every MoE layer, only the selected experts resident:
the fused ``gate_up_proj`` / ``down_proj`` tensors hold the selected rows (slot s = the s-th
selected expert, ascending), and the router keeps only those rows, so routing can only ever pick
a selected expert. Attention, norms, embeddings, lm_head and shared experts are kept whole.
``SubsetModel.expert_ids`` records slot -> original expert id per layer; it is the only way
back to canonical keys. Building a subset never holds a second copy of all experts: in memory
only the selected rows are copied, from disk only the selected tensors are read.

Routing in the subset is an approximation of the full model's, by construction: the router's
softmax (or sigmoid) runs over the selected experts only, top-k becomes ``min(k, selected)``,
and grouped routing is made ungrouped (DeepSeek-V2 ``topk_method="greedy"``; DeepSeek-V3 picks
the top-k of ``sigmoid + e_score_correction_bias`` over the selected experts with no group
limit), because the original groups are meaningless once most of their experts are gone.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import types
from collections.abc import Iterable, KeysView
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from connito.config import ModelConfig
from connito.errors import ConfigError
from connito.ml.moe import PROJECTIONS, MoELayer, expert_key, moe_layers, read_expert, write_experts

logger = logging.getLogger(__name__)

__all__ = [
    "SubsetModel",
    "extract_subset",
    "load_subset_model",
    "write_back",
    "subset_expert_state",
    "check_selection",
]

# Config fields (or aliases) that hold the routed-expert count, across the supported families.
_EXPERT_COUNT_FIELDS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Checkpoint names save_pretrained writes for one expert (Mixtral keeps its original w1/w3/w2).
_DISK_EXPERT_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_DISK_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SubsetModel:
    """A transformers model holding only the selected experts, and the slot -> expert map."""

    model: PreTrainedModel
    expert_ids: dict[int, tuple[int, ...]]  # layer -> original expert id of each slot (ascending)
    full_num_experts: dict[int, int]  # layer -> routed experts in the base model

    @property
    def selection(self) -> dict[int, list[int]]:
        """``{layer: [original expert id, ...]}`` of the resident experts."""
        return {layer: list(ids) for layer, ids in self.expert_ids.items()}

    def slot_of(self, layer: int, expert: int) -> int:
        """The slot that holds original expert ``expert`` of ``layer``.

        Raises:
            ConfigError: the expert is not resident in this subset.
        """
        ids = self.expert_ids.get(layer, ())
        if expert not in ids:
            raise ConfigError(
                f"expert {layer}.{expert} is not in the subset (resident: {list(ids)})", field="selection"
            )
        return ids.index(expert)


def check_selection(
    selection: dict[int, list[int]], num_experts: dict[int, int]
) -> dict[int, tuple[int, ...]]:
    """``selection`` as sorted tuples, checked against the model's MoE layers.

    Raises:
        ConfigError: a layer is not an MoE layer, a layer is empty, or an id is out of range or repeated.
    """
    checked: dict[int, tuple[int, ...]] = {}
    for layer in sorted(selection):
        experts = sorted(int(e) for e in selection[layer])
        if layer not in num_experts:
            raise ConfigError(
                f"layer {layer} is not an MoE layer (MoE layers: {sorted(num_experts)})", field="selection"
            )
        if not experts or len(set(experts)) != len(experts):
            raise ConfigError(
                f"layer {layer}: experts must be non-empty and unique, got {experts}", field="selection"
            )
        if experts[0] < 0 or experts[-1] >= num_experts[layer]:
            raise ConfigError(
                f"layer {layer}: expert ids must be in 0..{num_experts[layer] - 1}, got {experts}",
                field="selection",
            )
        checked[int(layer)] = tuple(experts)
    return checked


def _check_covers_every_layer(selection: dict[int, tuple[int, ...]], num_experts: dict[int, int]) -> None:
    # A subset layer with no experts would silently drop that layer's routed output.
    missing = sorted(set(num_experts) - set(selection))
    if missing:
        raise ConfigError(
            f"a subset model needs >= 1 selected expert in every MoE layer; none in layers {missing}",
            field="selection",
        )


def _skeleton_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``hf_config`` with one routed expert per layer and no routing groups."""
    config = copy.deepcopy(hf_config)
    for name in _EXPERT_COUNT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, 1)
    for name in ("n_group", "topk_group"):
        if getattr(config, name, None) is not None:
            setattr(config, name, 1)
    if getattr(config, "topk_method", None) is not None:
        config.topk_method = "greedy"
    return config


def _build_skeleton(
    hf_config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The model with every layer's experts shrunk to one, weights left uninitialised.

    Every parameter is overwritten afterwards (the loaders check that none is left), so the random
    init is skipped; buffers computed in ``__init__`` (rotary ``inv_freq``) are real, which is why
    this does not use the meta device. The model's config is given back the base model's expert
    count and grouping: per-layer counts live in the modules (``num_experts``, ``top_k``).
    """
    kwargs = {}
    experts_implementation = getattr(hf_config, "_experts_implementation", None)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(_skeleton_config(hf_config), dtype=dtype, **kwargs)
    for name in (*_EXPERT_COUNT_FIELDS, "n_group", "topk_group", "topk_method"):
        if hasattr(hf_config, name):
            setattr(model.config, name, getattr(hf_config, name))
    return model.eval()


def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) by state-dict name, as live objects."""
    table = dict(model.state_dict(keep_vars=True))
    table.update(model.named_buffers())
    return table


def _ungrouped_sigmoid_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DeepSeek-V3 routing over the subset without group limits (transformers 5.23 math otherwise).

    With one group the original forward is the same function, except that it takes a top-2 inside
    each group, which fails for a layer with a single selected expert.
    """
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(
        hidden_states.type(torch.float32), self.weight.type(torch.float32)
    )
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, topk_indices


def _install_layer(
    layer: MoELayer,
    *,
    gate_up: torch.Tensor,  # (n, 2*I, H)
    down: torch.Tensor,  # (n, H, I)
    router_rows: dict[str, torch.Tensor],  # router param/buffer name -> (n, ...) rows
    top_k: int,
) -> None:
    """Make ``layer`` (of a skeleton) hold exactly these ``n`` experts and route only among them."""
    count = int(gate_up.shape[0])
    # the architectures' own attributes, rewritten in place: typed by the model class, not nn.Module
    experts: Any = layer.experts
    router: Any = layer.router
    block: Any = layer.block
    experts.gate_up_proj = nn.Parameter(gate_up)
    experts.down_proj = nn.Parameter(down)
    experts.num_experts = count
    for name, rows in router_rows.items():
        if name in router._parameters:
            setattr(router, name, nn.Parameter(rows, requires_grad=router._parameters[name].requires_grad))
        else:
            router._buffers[name] = rows
    router.num_experts = count
    router.top_k = min(top_k, count)
    if hasattr(block, "top_k"):  # Mixtral keeps a copy on the block
        block.top_k = router.top_k
    if hasattr(router, "topk_method"):  # DeepSeek-V2: groups are gone, route greedily
        router.topk_method = "greedy"
    if hasattr(router, "num_group"):
        router.num_group = 1
        router.topk_group = 1
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3
        router.forward = types.MethodType(_ungrouped_sigmoid_router_forward, router)


def _router_row_names(router: nn.Module, num_experts: int) -> list[str]:
    """Router tensors indexed by expert along dim 0 (``weight``, DeepSeek-V3's correction bias)."""
    names = [
        n for n, p in router.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts
    ]
    names += [n for n, b in router.named_buffers(recurse=False) if b.dim() >= 1 and b.shape[0] == num_experts]
    return names


def _subset_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the skeleton that the subset installer owns (experts and router rows)."""
    owned: set[str] = set()
    for layer in moe_layers(model):
        prefix = f"model.layers.{layer.index}.mlp"
        owned |= {f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"}
        owned |= {f"{prefix}.gate.{name}" for name in _router_row_names(layer.router, 1)}
    return owned


def _copy_into(target: torch.Tensor, source: torch.Tensor, *, key: str, where: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ConfigError(
            f"shape {tuple(source.shape)}, expected {tuple(target.shape)}", path=where, field=key
        )
    with torch.no_grad():
        target.copy_(source)


def _check_all_filled(model: nn.Module, filled: set[str], *, where: str) -> None:
    """Every skeleton tensor was written (tied weights count through their twin)."""
    state = model.state_dict(keep_vars=True)
    filled_ptrs = {state[k].data_ptr() for k in filled}
    missing = sorted(k for k, t in state.items() if k not in filled and t.data_ptr() not in filled_ptrs)
    if missing:
        raise ConfigError(f"{len(missing)} tensors missing, first {missing[0]}", path=where, field=missing[0])


def extract_subset(full_model: PreTrainedModel, selection: dict[int, list[int]]) -> SubsetModel:
    """A subset model holding copies of ``selection``'s experts of an in-memory model.

    The full model is only read. Non-expert weights and the selected expert rows are copied (never
    all experts), so training the subset never touches ``full_model``; bring the result back with
    ``write_back``.

    Raises:
        ConfigError: the selection names a non-MoE layer, an out-of-range expert, or leaves an
            MoE layer without experts.
    """
    full_layers = {layer.index: layer for layer in moe_layers(full_model)}
    num_experts = {index: layer.num_experts for index, layer in full_layers.items()}
    chosen = check_selection(selection, num_experts)
    _check_covers_every_layer(chosen, num_experts)
    reference = next(full_model.parameters())
    subset = _build_skeleton(full_model.config, dtype=reference.dtype, device=reference.device)
    owned = _subset_keys(subset)
    source = _tensor_table(full_model)
    for key, target in _tensor_table(subset).items():
        if key not in owned:
            _copy_into(target, source[key], key=key, where="<in-memory model>")
    for layer in moe_layers(subset):
        full = full_layers[layer.index]
        index = torch.tensor(chosen[layer.index], device=reference.device)
        with torch.no_grad():
            rows = {
                name: getattr(full.router, name).detach().index_select(0, index)
                for name in _router_row_names(full.router, full.num_experts)
            }
            _install_layer(
                layer,
                gate_up=full.gate_up_proj.detach().index_select(0, index),
                down=full.down_proj.detach().index_select(0, index),
                router_rows=rows,
                top_k=full.top_k,
            )
    logger.info("subset extracted experts=%d layers=%d", sum(map(len, chosen.values())), len(chosen))
    return SubsetModel(model=subset, expert_ids=chosen, full_num_experts=num_experts)


class _Checkpoint:
    """Lazy reader over a ``save_pretrained`` folder (single file or sharded with an index)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise ConfigError("no model.safetensors or model.safetensors.index.json", path=str(folder))
        self._files = {
            name: stack.enter_context(safe_open(folder / name, framework="pt"))
            for name in set(weight_map.values())
        }
        self._where = {key: self._files[name] for key, name in weight_map.items()}
        self.expert_keys = _disk_experts(self._where)

    def keys(self) -> KeysView[str]:
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def rows(self, key: str, index: tuple[int, ...]) -> torch.Tensor:
        """Rows ``index`` of a tensor, reading only those rows from disk."""
        part = self._where[key].get_slice(key)
        return torch.cat([part[e : e + 1] for e in index], dim=0)


def _model_key(disk_key: str) -> str:
    """The in-memory name of a checkpoint tensor (Mixtral's checkpoint says ``block_sparse_moe``)."""
    return re.sub(r"^(model\.layers\.\d+)\.block_sparse_moe\.", r"\1.mlp.", disk_key)


def _disk_experts(keys: Iterable[str]) -> dict[tuple[int, int, str], str]:
    """``(layer, expert, projection) -> checkpoint key`` for per-expert checkpoints."""
    found: dict[tuple[int, int, str], str] = {}
    for key in keys:
        match = _DISK_EXPERT_RE.match(key)
        if match is not None:
            projection = _DISK_PROJECTION.get(match.group(3), match.group(3))
            found[(int(match.group(1)), int(match.group(2)), projection)] = key
    return found


def _read_expert_rows(
    checkpoint: _Checkpoint, layer: int, experts: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up (n, 2*I, H), down (n, H, I))`` of the given experts, read from disk."""
    fused_gate_up = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    if fused_gate_up in checkpoint.keys():  # saved with save_original_format=False
        down_key = f"model.layers.{layer}.mlp.experts.down_proj"
        return checkpoint.rows(fused_gate_up, experts), checkpoint.rows(down_key, experts)
    gate_up, down = [], []
    for expert in experts:
        try:
            gate, up, dn = (checkpoint.get(checkpoint.expert_keys[(layer, expert, p)]) for p in PROJECTIONS)
        except KeyError:
            key = expert_key(layer, expert, "gate_proj")
            raise ConfigError(
                "expert tensors not in the checkpoint", path=str(checkpoint.folder), field=key
            ) from None
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(dn)
    return torch.stack(gate_up), torch.stack(down)


def _resolve_config(
    model_dir: Path, model_cfg: ModelConfig | PretrainedConfig | None, dtype: torch.dtype | None
) -> tuple[PretrainedConfig, torch.dtype]:
    """The transformers config and weights dtype: explicit ``dtype``, then ModelConfig, then config.json."""
    if isinstance(model_cfg, PretrainedConfig):
        hf_config = model_cfg
    else:
        hf_config = AutoConfig.from_pretrained(str(model_dir))
    if isinstance(model_cfg, ModelConfig):
        if model_cfg.experts_implementation is not None:
            hf_config._experts_implementation = model_cfg.experts_implementation
        return hf_config, dtype or _DTYPES[model_cfg.dtype]
    config_dtype = getattr(hf_config, "dtype", None)
    return hf_config, dtype or (config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32)


def _expert_count(hf_config: PretrainedConfig) -> int:
    for name in _EXPERT_COUNT_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"config has none of {_EXPERT_COUNT_FIELDS}", field="model")


def _router_disk_key(checkpoint: _Checkpoint, layer: int, name: str) -> str:
    for block in ("mlp", "block_sparse_moe"):
        key = f"model.layers.{layer}.{block}.gate.{name}"
        if key in checkpoint.keys():
            return key
    key = f"model.layers.{layer}.mlp.gate.{name}"
    raise ConfigError("router tensor not in the checkpoint", path=str(checkpoint.folder), field=key)


def _load_non_experts(subset: PreTrainedModel, checkpoint: _Checkpoint) -> None:
    """Copy every tensor but the experts and router rows from disk; fail if one is missing."""
    owned = _subset_keys(subset)
    targets = {k: t for k, t in subset.state_dict(keep_vars=True).items() if k not in owned}
    filled = set(owned)
    for disk_key in checkpoint.keys():
        key = _model_key(disk_key)
        if key in targets:
            _copy_into(targets[key], checkpoint.get(disk_key), key=key, where=str(checkpoint.folder))
            filled.add(key)
    _check_all_filled(subset, filled, where=str(checkpoint.folder))


def _load_layer(checkpoint: _Checkpoint, layer: MoELayer, experts: tuple[int, ...], *, top_k: int) -> None:
    """Install the experts ``experts`` of ``layer`` and their router rows, read from disk."""
    gate_up, down = _read_expert_rows(checkpoint, layer.index, experts)
    like = layer.gate_up_proj  # (1, 2*I, H) in the skeleton
    expected = {
        "gate_up_proj": (len(experts), *like.shape[1:]),
        "down_proj": (len(experts), *layer.down_proj.shape[1:]),
    }
    for name, tensor in (("gate_up_proj", gate_up), ("down_proj", down)):
        if tuple(tensor.shape) != expected[name]:
            field = f"model.layers.{layer.index}.mlp.experts.{name}"
            raise ConfigError(
                f"shape {tuple(tensor.shape)}, expected {expected[name]}",
                path=str(checkpoint.folder),
                field=field,
            )
    router_rows = {}
    for name in _router_row_names(layer.router, 1):
        rows = checkpoint.rows(_router_disk_key(checkpoint, layer.index, name), experts)
        reference = getattr(layer.router, name)
        router_rows[name] = rows.to(device=reference.device, dtype=reference.dtype)
    _install_layer(
        layer,
        gate_up=gate_up.to(device=like.device, dtype=like.dtype),
        down=down.to(device=like.device, dtype=like.dtype),
        router_rows=router_rows,
        top_k=top_k,
    )


def load_subset_model(
    model_dir: str | Path,
    model_cfg: ModelConfig | PretrainedConfig | None,
    selection: dict[int, list[int]],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> SubsetModel:
    """The subset model of a ``save_pretrained`` folder, reading only the selected experts.

    Unselected experts are never read into memory: the skeleton is built with one expert per
    layer, every non-expert tensor is copied in, and each layer's fused tensors are replaced by
    the selected rows read lazily through ``safetensors.safe_open``. ``model_cfg`` is connito's
    ``ModelConfig`` (dtype and experts kernel; the architecture comes from ``config.json``), a
    transformers config, or None (everything from the folder).

    Raises:
        ConfigError: the folder has no safetensors weights, lacks a tensor, has a wrong shape, or
            the selection does not fit the model.
    """
    folder = Path(model_dir)
    hf_config, resolved_dtype = _resolve_config(folder, model_cfg, dtype)
    subset = _build_skeleton(hf_config, dtype=resolved_dtype, device=torch.device(device))
    layers = moe_layers(subset)
    num_experts = {layer.index: _expert_count(hf_config) for layer in layers}
    chosen = check_selection(selection, num_experts)
    _check_covers_every_layer(chosen, num_experts)
    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)
        _load_non_experts(subset, checkpoint)
        for layer in layers:
            _load_layer(checkpoint, layer, chosen[layer.index], top_k=layer.top_k)
    logger.info(
        "subset loaded path=%s experts=%d layers=%d", folder, sum(map(len, chosen.values())), len(chosen)
    )
    return SubsetModel(model=subset, expert_ids=chosen, full_num_experts=num_experts)


def subset_expert_state(subset: SubsetModel) -> dict[str, torch.Tensor]:
    """Copies of every resident expert under its canonical key with its ORIGINAL expert id."""
    state: dict[str, torch.Tensor] = {}
    for layer in moe_layers(subset.model):
        for slot, expert in enumerate(subset.expert_ids[layer.index]):
            for projection, tensor in read_expert(layer, slot).items():
                state[expert_key(layer.index, expert, projection)] = tensor
    return state


def write_back(full_model: PreTrainedModel, subset: SubsetModel) -> None:
    """Write the subset's experts into their original slots of ``full_model``, in place.

    Only the rows of the resident experts change; every other tensor of ``full_model`` is untouched.

    Raises:
        ConfigError: ``full_model`` does not have the subset's layers and expert counts.
    """
    counts = {layer.index: layer.num_experts for layer in moe_layers(full_model)}
    for layer, count in subset.full_num_experts.items():
        if layer in subset.expert_ids and counts.get(layer) != count:
            raise ConfigError(
                f"layer {layer}: full model has {counts.get(layer)} experts, subset expects {count}",
                field="model",
            )
    write_experts(full_model, subset_expert_state(subset))
