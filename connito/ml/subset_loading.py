"""Loading a subset model from a ``save_pretrained`` folder, reading only the selected experts.

The skeleton (``connito.ml.subset_skeleton``) gets every non-expert tensor from the checkpoint,
and each MoE layer gets the selected experts' rows and router rows, read lazily through
``safetensors.safe_open``: the unselected experts never reach memory. Both checkpoint layouts
are read: per-expert tensors (``save_pretrained``'s default, Mixtral's ``w1/w3/w2`` too) and
fused ``gate_up_proj`` / ``down_proj``, in one file or sharded with an index.

May import: connito.config, connito.errors, connito.ml.moe, connito.ml.subset,
connito.ml.subset_skeleton.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, KeysView
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from connito.config import ModelConfig
from connito.errors import ConfigError, UnsupportedModelError
from connito.ml.modeling import TORCH_DTYPES
from connito.ml.moe import PROJECTIONS, MoELayer, check_model_type, expert_key, moe_layers
from connito.ml.moe_families import Family
from connito.ml.subset import SubsetModel, check_covers_every_layer, check_selection
from connito.ml.subset_skeleton import (
    EXPERT_COUNT_FIELDS,
    build_skeleton,
    copy_into,
    expert_indexed,
    install_layer,
    subset_keys,
)

logger = logging.getLogger(__name__)

__all__ = ["load_subset_model"]

# Checkpoint names save_pretrained writes for one expert (Mixtral keeps its original w1/w3/w2).
_DISK_EXPERT_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_DISK_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class _Checkpoint:
    """Lazy reader over a ``save_pretrained`` folder (single file or sharded with an index)."""

    def __init__(self, folder: Path, stack: ExitStack, config: PretrainedConfig) -> None:
        self.folder = folder
        self.config = config
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

    def rows(self, key: str, index: tuple[int, ...], *, dim: int = 0) -> torch.Tensor:
        """Entries ``index`` of a tensor along ``dim``, reading only those rows from disk."""
        if dim != 0:  # small router-side tensors (ERNIE's (1, E) correction bias)
            return self.get(key).index_select(dim, torch.tensor(index))
        part = self._where[key].get_slice(key)
        return torch.cat([part[e : e + 1] for e in index], dim=0)


def _model_key(disk_key: str, family: Family) -> str:
    """The in-memory name of a checkpoint tensor (Mixtral's checkpoint says ``block_sparse_moe``)."""
    if family.disk_block is None:
        return disk_key
    return re.sub(rf"^(model\.layers\.\d+)\.{family.disk_block}\.", r"\1.mlp.", disk_key)


def _disk_experts(keys: Iterable[str]) -> dict[tuple[int, int, str], str]:
    """``(layer, expert, projection) -> checkpoint key`` for per-expert checkpoints."""
    found: dict[tuple[int, int, str], str] = {}
    for key in keys:
        match = _DISK_EXPERT_RE.match(key)
        if match is not None:
            projection = _DISK_PROJECTION.get(match.group(3), match.group(3))
            found[(int(match.group(1)), int(match.group(2)), projection)] = key
    return found


def _per_expert_rows(
    checkpoint: _Checkpoint, layer: int, experts: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """``experts.gate_up_proj (n, 2*I, H)`` and ``experts.down_proj (n, H, I)`` from per-expert keys."""
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
    return {"experts.gate_up_proj": torch.stack(gate_up), "experts.down_proj": torch.stack(down)}


def _disk_key(checkpoint: _Checkpoint, layer: MoELayer, name: str) -> str:
    """The checkpoint key of block tensor ``name`` (Mixtral's checkpoint says ``block_sparse_moe``)."""
    blocks = [layer.block_name, *([layer.family.disk_block] if layer.family.disk_block else [])]
    for block in blocks:
        key = f"model.layers.{layer.index}.{block}.{name}"
        if key in checkpoint.keys():
            return key
    key = f"model.layers.{layer.index}.{layer.block_name}.{name}"
    raise ConfigError("tensor not in the checkpoint", path=str(checkpoint.folder), field=key)


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
        return hf_config, dtype or TORCH_DTYPES[model_cfg.dtype]
    config_dtype = getattr(hf_config, "dtype", None)
    return hf_config, dtype or (config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32)


def _expert_count(hf_config: PretrainedConfig) -> int:
    for name in EXPERT_COUNT_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"config has none of {EXPERT_COUNT_FIELDS}", field="model")


def _check_all_filled(model: nn.Module, filled: set[str], *, where: str) -> None:
    """Every skeleton tensor was written (tied weights count through their twin)."""
    state = model.state_dict(keep_vars=True)
    filled_ptrs = {state[k].data_ptr() for k in filled}
    missing = sorted(k for k, t in state.items() if k not in filled and t.data_ptr() not in filled_ptrs)
    if missing:
        raise ConfigError(f"{len(missing)} tensors missing, first {missing[0]}", path=where, field=missing[0])


def _load_non_experts(subset: PreTrainedModel, checkpoint: _Checkpoint) -> None:
    """Copy every tensor but the experts and router rows from disk; fail if one is missing."""
    owned = subset_keys(subset)
    family = moe_layers(subset)[0].family
    targets = {k: t for k, t in subset.state_dict(keep_vars=True).items() if k not in owned}
    filled = set(owned)
    for disk_key in checkpoint.keys():
        key = _model_key(disk_key, family)
        if key in targets:
            copy_into(targets[key], checkpoint.get(disk_key), key=key, where=str(checkpoint.folder))
            filled.add(key)
    _check_all_filled(subset, filled, where=str(checkpoint.folder))


def _load_layer(
    checkpoint: _Checkpoint, layer: MoELayer, experts: tuple[int, ...], *, top_k: int, num_experts: int
) -> None:
    """Install the experts ``experts`` of ``layer`` and their router rows, read from disk."""
    targets = expert_indexed(layer, 1)
    rows: dict[str, torch.Tensor] = {}
    if (layer.index, experts[0], "gate_proj") in checkpoint.expert_keys:  # save_pretrained's per-expert keys
        rows.update(_per_expert_rows(checkpoint, layer.index, experts))
    for name, (module, attr, dim) in targets.items():
        if name not in rows:
            rows[name] = checkpoint.rows(_disk_key(checkpoint, layer, name), experts, dim=dim)
        like = getattr(module, attr)
        expected = tuple(like.shape[:dim]) + (len(experts),) + tuple(like.shape[dim + 1 :])
        if tuple(rows[name].shape) != expected:
            field = f"model.layers.{layer.index}.{layer.block_name}.{name}"
            raise ConfigError(
                f"shape {tuple(rows[name].shape)}, expected {expected}",
                path=str(checkpoint.folder),
                field=field,
            )
        rows[name] = rows[name].to(device=like.device, dtype=like.dtype)
    install_layer(
        layer,
        rows=rows,
        top_k=top_k,
        grouping=_grouping(layer, checkpoint),
        complete=len(experts) == num_experts,
    )


def _grouping(layer: MoELayer, checkpoint: _Checkpoint) -> dict[str, object]:
    """The base router's group attributes, from the config the skeleton was given back."""
    config = checkpoint.config
    names = {
        "num_group": "n_group",
        "n_group": "n_group",
        "topk_group": "topk_group",
        "topk_method": "topk_method",
    }
    return {
        attr: getattr(config, field)
        for attr, field in names.items()
        if hasattr(layer.router, attr) and getattr(config, field, None) is not None
    }


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
        UnsupportedModelError: the family is refused, or its checkpoint names are not read here
            (``Family.disk_subset``).
    """
    folder = Path(model_dir)
    hf_config, resolved_dtype = _resolve_config(folder, model_cfg, dtype)
    family = check_model_type(str(hf_config.model_type))
    if not family.disk_subset:
        raise UnsupportedModelError(
            f"model_type={family.model_type}: a subset cannot be read from its checkpoint yet (save_pretrained "
            "renames its tensors); load the model and use extract_subset, or residency: full"
        )
    subset = build_skeleton(hf_config, dtype=resolved_dtype, device=torch.device(device))
    layers = moe_layers(subset)
    num_experts = {layer.index: _expert_count(hf_config) for layer in layers}
    chosen = check_selection(selection, num_experts)
    check_covers_every_layer(chosen, num_experts)
    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack, hf_config)
        _load_non_experts(subset, checkpoint)
        for layer in layers:
            _load_layer(
                checkpoint,
                layer,
                chosen[layer.index],
                top_k=layer.top_k,
                num_experts=num_experts[layer.index],
            )
    logger.info(
        "subset loaded path=%s experts=%d layers=%d", folder, sum(map(len, chosen.values())), len(chosen)
    )
    return SubsetModel(model=subset, expert_ids=chosen, full_num_experts=num_experts)
