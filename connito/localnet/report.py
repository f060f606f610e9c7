"""The localnet report: ``report.json`` (schema below) and ``report.png`` (losses and weights per cycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connito.fsutil import atomic_write

__all__ = ["LossPair", "CycleReport", "LocalnetReport", "write_report", "render_plot", "format_cycle_row"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossPair(_Strict):
    domain_val_loss: float
    general_val_loss: float


class CycleReport(_Strict):
    """What happened in one cycle, as the lead validator recorded it and the owner measured it."""

    cycle: int
    domain_val_loss: float = Field(description="held-out domain loss of the global model after this cycle")
    general_val_loss: float = Field(description="held-out general loss of the global model after this cycle")
    submissions: int
    accepted: int
    rejected: dict[str, str] = Field(description="hotkey -> rejection reason")
    merged: list[str] = Field(description="hotkeys whose pseudo-gradients entered the global model")
    weights: dict[int, float] = Field(description="uid -> weight the lead validator set this cycle")
    global_revision: str = Field(description="tensor digest of the global experts after this cycle")
    decision: str = Field("none", description="merged | best_single | none")
    validator_agreement: float | None = Field(
        None, description="smallest cosine between the lead's weight vector and another validator's"
    )
    scaled: dict[str, Any] | None = Field(
        None, description="the scaled adversary: factor, rank, and the rank its unscaled update measures"
    )


class LocalnetReport(_Strict):
    schema_version: int = 2
    baseline: LossPair
    cycles: list[CycleReport]
    adversaries: dict[str, str] = Field(description="hotkey -> adversary kind")
    selection: dict[str, Any]
    hotkeys: dict[str, str] = Field(
        default_factory=dict, description="hotkey -> role name (m0, v0, adv-copy...)"
    )
    uids: dict[str, int] = Field(default_factory=dict, description="hotkey -> uid")
    wall_s: float = 0.0


def write_report(report: LocalnetReport, path: Path) -> None:
    atomic_write(path, (report.model_dump_json(indent=2) + "\n").encode("utf-8"))


def format_cycle_row(row: CycleReport, baseline: LossPair, names: dict[str, str]) -> str:
    """One printable line per cycle for the terminal table."""
    drop = 100.0 * (row.domain_val_loss - baseline.domain_val_loss) / baseline.domain_val_loss
    drift = 100.0 * (row.general_val_loss - baseline.general_val_loss) / baseline.general_val_loss
    merged = ",".join(names.get(h, h[:8]) for h in row.merged) or "-"
    rejected = ",".join(f"{names.get(h, h[:8])}:{r}" for h, r in sorted(row.rejected.items())) or "-"
    agreement = (
        f" | validators agree {row.validator_agreement:.3f}" if row.validator_agreement is not None else ""
    )
    scaled = ""
    if row.scaled and row.scaled.get("unscaled_rank") is not None:
        scaled = f" | scaled x{row.scaled['factor']:.2f} rank {row.scaled['rank']} (unscaled {row.scaled['unscaled_rank']})"
    return (
        f"cycle {row.cycle:>2} | domain {row.domain_val_loss:.4f} ({drop:+.1f}% vs base) | "
        f"general {row.general_val_loss:.4f} ({drift:+.2f}%) | {row.accepted}/{row.submissions} accepted | "
        f"{row.decision}: {merged} | rejected {rejected}{agreement}{scaled}"
    )


def render_plot(report: LocalnetReport, path: Path) -> None:
    """Domain and general held-out loss per cycle (left) and the weights set per cycle (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uid_names = {uid: report.hotkeys.get(hotkey, f"uid {uid}") for hotkey, uid in report.uids.items()}
    cycles = [-1] + [row.cycle for row in report.cycles]
    base = report.baseline

    def change(values: list[float], reference: float) -> list[float]:
        return [100.0 * (v - reference) / reference for v in values]

    domain = change([row.domain_val_loss for row in report.cycles], base.domain_val_loss)
    general = change([row.general_val_loss for row in report.cycles], base.general_val_loss)
    fig, (ax_loss, ax_weights) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(
        cycles, [0.0, *domain], marker="o", label=f"domain held-out (base {base.domain_val_loss:.3f})"
    )
    ax_loss.plot(
        cycles, [0.0, *general], marker="s", label=f"general held-out (base {base.general_val_loss:.3f})"
    )
    ax_loss.axhline(0.0, color="grey", linewidth=0.8)
    ax_loss.set_xticks(cycles, ["base"] + [str(c) for c in cycles[1:]])
    ax_loss.set_xlabel("cycle")
    ax_loss.set_ylabel("loss change vs base model (%)")
    ax_loss.set_title("Global model held-out loss")
    ax_loss.legend()
    uid_name: dict[int, str] = {}
    for row in report.cycles:
        for uid in row.weights:
            uid_name.setdefault(uid, uid_names.get(uid, f"uid {uid}"))
    for uid in sorted(uid_name):
        ax_weights.plot(
            [row.cycle for row in report.cycles],
            [row.weights.get(uid, 0.0) for row in report.cycles],
            marker="o",
            label=uid_name[uid],
        )
    ax_weights.set_xticks([row.cycle for row in report.cycles])
    ax_weights.set_xlabel("cycle")
    ax_weights.set_ylabel("weight")
    ax_weights.set_title("Weights set by the lead validator")
    if uid_name:
        ax_weights.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
