"""What the ``scaled`` adversary's update would have ranked unscaled, measured as the lead scored it.

The adversary trains honestly, then multiplies its update by the largest factor the update bound
allows and records the factor. The report rebuilds the unscaled update from its checkpoint and
the global it trained from, measures it at the step length the lead measured the scaled one at
(its row's ``scored_norm``) on the lead's own evaluation sample, and ranks it among
that cycle's accepted rows in place of the scaled one.

May import: connito.config, connito.data, connito.ml, connito.protocol, connito.localnet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from connito.config import DomainConfig
from connito.data import DomainData
from connito.ml.modeling import mean_batch_loss
from connito.ml.moe import write_experts
from connito.protocol.checkpoint import EXPERTS_FILE
from connito.protocol.step_length import at_step

__all__ = ["scaled_rows"]


def scaled_rows(
    *,
    workdir: Path,
    config: DomainConfig,
    lead_data: DomainData,
    model: nn.Module,
    record: dict[str, Any],
    hotkey: str,
    node: str,
    trained_from: dict[str, torch.Tensor],
) -> dict[str, Any] | None:
    """The scaled row and its unscaled counterpart for one cycle; None when it did not submit."""
    cycle = int(record["cycle"])
    factor_path = workdir / "nodes" / node / "scaled" / f"{cycle}.json"
    checkpoint = workdir / "nodes" / node / "checkpoints" / str(cycle) / EXPERTS_FILE
    row = next((r for r in record["scores"] if r["hotkey"] == hotkey), None)
    if row is None or not factor_path.exists() or not checkpoint.exists():
        return None
    factor = float(json.loads(factor_path.read_text())["factor"])
    out: dict[str, Any] = {
        "hotkey": hotkey,
        "factor": factor,
        "accepted": row["accepted"],
        "reason": row["reason"],
    }
    out["rank"] = _rank(record["scores"], hotkey, row["domain_loss"]) if row["accepted"] else None
    rho = row.get("scored_norm")  # the step length the lead measured the scaled update at
    if rho is None or not row["accepted"]:
        return out
    scaled = load_file(str(checkpoint))
    unscaled_norm = (
        math.sqrt(sum(float(((trained_from[k].float() - scaled[k].float()) ** 2).sum()) for k in scaled))
        / factor
    )
    point = at_step(trained_from, scaled, rho / (factor * unscaled_norm))  # the unscaled update at rho
    scoring = config.scoring
    batches = lead_data.heldout_sample(
        int(record["eval_seed"]), scoring.eval_batches, scoring.eval_batch_size
    )
    write_experts(model, point)
    unscaled_loss = mean_batch_loss(model, batches)
    out.update(
        domain_loss=row["domain_loss"],
        unscaled_domain_loss=unscaled_loss,
        unscaled_rank=_rank(record["scores"], hotkey, unscaled_loss),
    )
    return out


def _rank(scores: list[dict[str, Any]], hotkey: str, loss: float) -> int:
    """1-based rank of ``hotkey`` with ``loss`` among the accepted rows (ties: commit block, hotkey)."""
    rows = [
        (loss if r["hotkey"] == hotkey else r["domain_loss"], r["commit_block"], r["hotkey"])
        for r in scores
        if r["accepted"]
    ]
    return sorted(rows).index(next(x for x in rows if x[2] == hotkey)) + 1
