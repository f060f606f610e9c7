"""Build the localnet report: the owner measures every published global state on a fixed sample.

The per-cycle numbers come from two places: what the lead validator recorded (submissions,
rejections with reasons, merge decision, weights) and the owner's own measurement of the global
experts after that cycle on a fixed held-out sample, independent of the validators' seeded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from connito.config import DomainConfig
from connito.data import build_domain_data
from connito.localnet.private_eval import private_eval_file
from connito.localnet.report import CycleReport, LocalnetReport, LossPair
from connito.localnet.scaled_check import scaled_rows
from connito.ml.modeling import heldout_loss, load_model
from connito.ml.moe import read_experts, write_experts
from connito.ml.selection_record import load_selection
from connito.protocol.checkpoint import EXPERTS_FILE
from connito.protocol.merge import state_revision
from connito.protocol.weights import weight_cosine

__all__ = ["build_report", "REPORT_SEED"]

REPORT_SEED = 20261123
REPORT_BATCHES = 16
REPORT_BATCH_SIZE = 8


def _global_after(node_dir: Path, cycle: int) -> Path | None:
    """The newest global folder the lead published at or before ``cycle``."""
    folders = [p for p in (node_dir / "global").glob("*") if p.name.isdigit() and int(p.name) <= cycle]
    folders = [p for p in folders if (p / EXPERTS_FILE).exists()]
    return max(folders, key=lambda p: int(p.name)) if folders else None


def build_report(
    *,
    workdir: Path,
    config: DomainConfig,
    base_dir: Path,
    selection_path: Path,
    roles: dict[str, str],
    hotkeys: dict[str, str],
    cycles: int,
    wall_s: float,
) -> LocalnetReport:
    from safetensors.torch import load_file

    data = build_domain_data(config.data, cache_dir=workdir / "cache", model=config.model)
    domain_batches = data.heldout_sample(REPORT_SEED, REPORT_BATCHES, REPORT_BATCH_SIZE)
    general_batches = data.general_sample(REPORT_SEED, REPORT_BATCHES, REPORT_BATCH_SIZE)
    model = load_model(base_dir, config.model)
    selection = load_selection(selection_path)
    base_experts = read_experts(model, selection.experts_by_layer)

    def measure(experts: dict[str, torch.Tensor]) -> LossPair:
        write_experts(model, experts)
        return LossPair(
            domain_val_loss=heldout_loss(model, domain_batches),
            general_val_loss=heldout_loss(model, general_batches),
        )

    baseline = measure(base_experts)
    lead_dir = workdir / "nodes" / "v0"
    validators = [name for name, kind in roles.items() if kind == "validator"]
    scaled = [name for name, kind in roles.items() if kind == "scaled"]
    private = private_eval_file(workdir, "v0")
    lead_data = (
        build_domain_data(
            config.data, cache_dir=workdir / "cache", model=config.model, private_validation=[private]
        )
        if scaled and private.exists()
        else data
    )
    rows = []
    trained_from = base_experts
    for cycle in range(cycles):
        record_path = lead_dir / "cycles" / f"{cycle}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        folder = _global_after(lead_dir, cycle)
        experts = load_file(str(folder / EXPERTS_FILE)) if folder else base_experts
        losses = measure(experts)
        scores = record["scores"] if record else []
        scaled_row = (
            scaled_rows(
                workdir=workdir,
                config=config,
                lead_data=lead_data,
                model=model,
                record=record,
                hotkey=hotkeys[scaled[0]],
                node=scaled[0],
                trained_from=trained_from,
            )
            if scaled and record
            else None
        )
        trained_from = experts
        rows.append(
            CycleReport(
                cycle=cycle,
                domain_val_loss=losses.domain_val_loss,
                general_val_loss=losses.general_val_loss,
                submissions=len(scores),
                accepted=sum(1 for s in scores if s["accepted"]),
                rejected={s["hotkey"]: s["reason"] for s in scores if not s["accepted"]},
                merged=list(record["merged"]) if record else [],
                weights={int(uid): w for uid, w in (record["weights"] if record else {}).items()},
                global_revision=state_revision(experts),
                decision=record["decision"] if record else "missing",
                validator_agreement=_agreement(workdir, validators, cycle),
                scaled=scaled_row,
            )
        )
    return LocalnetReport(
        baseline=baseline,
        cycles=rows,
        adversaries={
            hotkeys[name]: kind for name, kind in roles.items() if kind not in ("miner", "validator")
        },
        selection=json.loads(selection_path.read_text()),
        hotkeys={hotkeys[name]: name for name in roles},
        uids={hotkeys[name]: uid for uid, name in enumerate(roles)},
        wall_s=wall_s,
    )


def _agreement(workdir: Path, validators: list[str], cycle: int) -> float | None:
    """The smallest cosine between the lead's weight vector and another validator's, this cycle."""
    weights = {}
    for name in validators:
        path = workdir / "nodes" / name / "cycles" / f"{cycle}.json"
        if path.exists():
            record = json.loads(path.read_text())
            if not record.get("skipped"):
                weights[name] = {int(uid): w for uid, w in record["weights"].items()}
    if "v0" not in weights or len(weights) < 2:
        return None
    return min(weight_cosine(weights["v0"], w) for name, w in weights.items() if name != "v0")
