"""The subnet owner's jobs: load or pretrain the base model, and run expert selection.

``connito select`` probes routing on the domain's training text (and general text for the
differential rule) and writes the selection JSON that every miner and validator then loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import PreTrainedModel

from connito.config import DomainConfig, load_domain_config
from connito.data import DomainData, build_domain_data
from connito.fsutil import atomic_write_json
from connito.ml.document_pools import DocumentPools
from connito.ml.model_config import check_model_config
from connito.ml.modeling import build_model, heldout_loss, load_model
from connito.ml.selection import probe_routing, select_experts
from connito.ml.selection_record import ExpertSelection, save_selection

logger = logging.getLogger(__name__)

__all__ = ["load_base_model", "build_selection", "run_select", "pretrain_base", "PRETRAIN_MARKER"]

PRETRAIN_MARKER = "connito_pretrain.json"


def load_base_model(
    config: DomainConfig, model_dir: Path | None = None, *, library: Path | None = None
) -> PreTrainedModel:
    """The base model: a local folder if given, else the config's Hub id, inline config, or
    ``library:DOMAIN@vN`` (that version's base with its experts, from the expert library ``library``).

    Raises:
        ConfigError: a library base without ``library``.
        LibraryError: the library version or its base model cannot be found.
    """
    if model_dir is not None:
        return load_model(model_dir, config.model)
    if config.model.inline is not None:
        return build_model(config.model)
    if config.model.base is not None:
        from connito.library.composition import load_library_base

        return load_library_base(config.model.base, library)
    assert config.model.id is not None, "config validation guarantees one model source"
    return load_model(config.model.id, config.model)


def _batches(blocks: torch.Tensor, batch_size: int):
    for start in range(0, len(blocks), batch_size):
        yield blocks[start : start + batch_size]


def build_selection(
    config: DomainConfig,
    model: PreTrainedModel,
    data: DomainData,
    *,
    model_revision: str,
    progress: bool = True,
) -> ExpertSelection:
    """Probe routing on domain (and, for the differential rule, general) text; select experts."""
    sel = config.selection
    domain_stats = probe_routing(
        model,
        _batches(data.train_blocks(0, 1), sel.probe_batch_size),
        max_tokens=sel.probe_tokens,
        progress=progress,
    )
    general_stats = None
    if sel.method == "differential" or len(data.general_blocks):
        general_stats = probe_routing(
            model,
            _batches(data.general_blocks, sel.probe_batch_size),
            max_tokens=sel.probe_tokens,
            progress=progress,
        )
    return select_experts(
        domain_stats,
        config=sel,
        general_stats=general_stats,
        domain=config.name,
        model_id=config.model.name,
        model_revision=model_revision,
        model_type=str(model.config.model_type),
    )


def run_select(
    config_path: Path,
    out: Path,
    *,
    model_dir: Path | None,
    cache_dir: Path,
    progress: bool = True,
    library: Path | None = None,
) -> int:
    """``connito select``: write the selection JSON and print one summary line per layer."""
    config = load_domain_config(config_path)
    check_model_config(config.model, config_path=config_path, model_dir=model_dir)  # before any weights
    model = load_base_model(config, model_dir, library=library)
    data = build_domain_data(config.data, cache_dir=cache_dir, model=config.model)
    revision = _model_revision(config, model_dir, library)
    selection = build_selection(config, model, data, model_revision=revision, progress=progress)
    save_selection(selection, out)
    sealed = selection.sealed()
    for entry in sealed.layers:
        print(f"layer {entry.layer}: experts {list(entry.experts)} of {len(entry.scores)}")
    print(f"wrote {out} ({sealed.num_selected} experts, digest {sealed.digest[:12]})")
    return 0


def _model_revision(config: DomainConfig, model_dir: Path | None, library: Path | None = None) -> str:
    if model_dir is not None:
        marker = model_dir / PRETRAIN_MARKER
        if marker.exists():
            import json

            return str(json.loads(marker.read_text())["revision"])
        return f"local:{model_dir.name}"
    if config.model.base is not None:  # DOMAIN@vN:<tensors digest>, pinned to the experts' content
        from connito.library.composition import library_base_revision

        return library_base_revision(config.model.base, library)
    if config.model.inline is not None:
        return f"init-seed-{config.model.init_seed}"
    return config.model.revision


def pretrain_base(
    config: DomainConfig,
    data: DomainData,
    out_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    mixture: dict[str, float],
    document_pools: Sequence[int] | None = None,
    progress: bool = True,
) -> PreTrainedModel:
    """Briefly pretrain an inline model on a general+code+math mixture; cache it in ``out_dir``.

    A real subnet starts from a pretrained Hub model; the localnet has none offline, so it makes a
    small one whose experts have specialised enough for selection to mean something. With
    ``document_pools`` (pool sizes) each row's tokens route inside one pool of experts
    (``connito.ml.document_pools``, EMO), so the experts group by domain and a domain's share of them
    can be exported alone. Cached by config digest and recipe, so a second run reuses it.
    """
    from tqdm import tqdm

    recipe: dict[str, object] = {"steps": steps, "batch_size": batch_size, "lr": lr, "mixture": mixture}
    if document_pools:
        recipe["document_pools"] = sorted(set(document_pools))
    marker = out_dir / PRETRAIN_MARKER
    # only what the pretrained weights depend on: changing cycles or scoring keeps the cache
    inputs = {"model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json")}
    key = {"inputs_digest": _digest(inputs), "recipe": recipe}
    if marker.exists():
        import json

        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in key} == key:
            logger.info("pretrain cache hit dir=%s", out_dir)
            return load_model(out_dir, config.model)
    model = build_model(config.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    loader = data.mixture_loader(batch_size, seed=config.training.seed, weights=mixture)
    pools = DocumentPools(model, document_pools, seed=config.training.seed) if document_pools else None
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, unit="step")
    with pools if pools is not None else nullcontext():
        for _ in bar:
            batch = next(loader)
            if pools is not None:
                pools.draw(len(batch))
            # router aux loss on while pretraining keeps experts balanced (transformers adds it to .loss)
            loss = model(input_ids=batch, labels=batch, output_router_logits=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    data.tokenizer.save_pretrained(out_dir)
    revision = _folder_revision(out_dir)
    domain_loss = heldout_loss(model, data.heldout_sample(0, 8, 8))
    atomic_write_json(marker, {**key, "revision": revision, "domain_val_loss": domain_loss})
    logger.info("pretrained base dir=%s steps=%d domain_val_loss=%.4f", out_dir, steps, domain_loss)
    return model


def _digest(obj: object) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _folder_revision(folder: Path) -> str:
    """A content revision of the saved weights (sha256 of model.safetensors, hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
