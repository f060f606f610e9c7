"""Does training with N miners and the DiLoCo outer step match one centralized sparse run?

Same total training tokens, same selected experts, same inner optimizer settings, in the
config's residency by default (``--residency subset|full`` overrides; ``subset`` trains a
``SubsetModel`` from ``load_subset_model``, ``full`` the whole frozen model's selected experts):

- ``distributed``: each cycle, each of N miners starts from the current global experts, trains H
  inner steps (``training.inner_steps``, ``training.batch_size``) on its own document shard
  (``data.train_loader(i, N, ...)``), and the N results are merged with
  ``OuterOptimizer.step`` (lr, momentum, Nesterov and clip from the config's ``merge`` section,
  uniform weights): the protocol with every miner honest and every submission merged; with
  ``training.keep_optimizer_state`` (the default) each miner carries its AdamW moments from one
  cycle to the next, as ``connito.node.miner`` does;
- ``central`` (synchronous data parallel, the DiLoCo paper's baseline): one trainer on the union
  of the data (``train_loader(0, 1, ...)``) taking H optimizer steps per cycle over N x the batch
  (gradient accumulation), AdamW kept across cycles: the same tokens and the same number of
  optimizer steps as the miners, synchronised every step instead of every H steps;
- ``sequential`` (reported beside, ``--no-sequential`` skips it): one trainer taking N x H steps
  per cycle at the miners' batch, the same tokens spent one after another. No parallel scheme
  reaches it per token in a few cycles; it shows what the parallelism costs.

The base is the config's model briefly pretrained on the general + code + math mixture
(``owner.pretrain_base``, cached in ``--cache-dir``) and the experts are selected the owner's way
(``owner.build_selection``, cached too). After every cycle the full model, holding each arm's
experts, is measured on a fixed held-out domain sample and a fixed general sample. Reported:
``domain_loss_reduction_ratio = (base - distributed_final) / (base - central_final)`` (target
>= 0.9), the same ratio against ``sequential``, and each arm's relative general-loss drift. Each
point also carries ``trainer_view_domain_loss``, the held-out loss of the model being trained
(the subset model in subset residency), to show how far the trainer's objective is from the full
model's.

    python benchmarks/distributed_vs_central.py --out d_vs_c.json [--miners 3] [--cycles 3] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import (
    PRETRAIN,
    add_common_flags,
    owner_base,
    owner_selection,
    pretrain_mixture,
    run_cached,
)
from torch import nn

from connito.config import DomainConfig, TrainingConfig
from connito.data import build_domain_data
from connito.ml.modeling import heldout_loss, load_model
from connito.ml.moe import expert_key, parse_expert_key, read_experts, write_experts
from connito.ml.outer import OuterOptimizer
from connito.ml.subset import SubsetModel, subset_expert_state
from connito.ml.subset_loading import load_subset_model
from connito.ml.training import SparseTrainer
from connito.ml.update_bound import moments_may_carry

TARGET_RATIO = 0.9  # distributed must reach >= this share of the centralized domain-loss drop

# (domain loss, general loss) of the full model holding an expert state
Measure = Callable[[dict[str, torch.Tensor]], tuple[float, float]]


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalSample:
    """The fixed batches every expert state is measured on."""

    domain: list[torch.Tensor]
    general: list[torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class CyclePoint:
    """One arm after one cycle."""

    cycle: int
    domain_loss: float
    general_loss: float
    trainer_view_domain_loss: float  # held-out domain loss of the trained model itself (subset or full)
    train_loss: float  # mean inner loss over the cycle's steps (all miners for distributed)
    tokens: int  # predicted training tokens consumed so far
    train_s: float  # wall time of this cycle's training (and merge)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--miners", type=int, default=3, help="N miners, one shard each (default 3)")
    parser.add_argument("--cycles", type=int, default=3, help="cycles of both arms (default 3)")
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="H per miner per cycle (default: the config's training.inner_steps)",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=PRETRAIN["steps"],
        help=f"base pretraining steps (default {PRETRAIN['steps']}, the localnet's)",
    )
    parser.add_argument(
        "--pretrain-batch-size", type=int, default=8, help="base pretraining batch (default 8)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=16, help="held-out domain batches measured (default 16)"
    )
    parser.add_argument("--general-batches", type=int, default=8, help="general batches measured (default 8)")
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="sequences per eval batch (default: scoring.eval_batch_size)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed evaluation sample (default 0)")
    parser.add_argument(
        "--residency",
        choices=("subset", "full"),
        default=None,
        help="what the trainers hold: subset or the full model (default: the config's training.residency)",
    )
    parser.add_argument(
        "--no-sequential",
        dest="sequential",
        action="store_false",
        help="skip the sequential N x H-step arm (reported beside the synchronous baseline)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.miners, args.cycles = min(args.miners, 2), min(args.cycles, 2)
        args.pretrain_steps, args.eval_batches, args.general_batches = 10, 4, 2
    if min(args.miners, args.cycles, args.pretrain_steps, args.eval_batches, args.general_batches) < 1:
        parser.error("--miners, --cycles, --pretrain-steps and the batch counts must be >= 1")
    if args.inner_steps is not None and args.inner_steps < 1:
        parser.error("--inner-steps must be >= 1")
    return args


# -- the two arms -------------------------------------------------------------------------------


def _measure(model: nn.Module, state: dict[str, torch.Tensor], sample: EvalSample) -> tuple[float, float]:
    """(domain, general) loss of the full model holding ``state``'s experts."""
    write_experts(model, state)
    return heldout_loss(model, sample.domain), heldout_loss(model, sample.general)


class _Trainee:
    """The model a trainer trains, in either residency, seen through canonical expert keys.

    ``subset``: a ``SubsetModel`` from ``load_subset_model`` (the miners' path: only the selected
    experts resident, routing among them only). ``full``: the whole base model, frozen but for the
    selected experts. ``view_loss`` is the held-out loss the trainer itself sees, which differs
    from the full model's in subset residency (the subset router renormalises over fewer experts).
    """

    def __init__(
        self,
        base_dir: Path,
        config: DomainConfig,
        selection: dict[int, list[int]],
        *,
        residency: str,
        device: torch.device,
        training: TrainingConfig | None = None,
    ) -> None:
        self.selection = selection
        self.training = training or config.training
        if residency == "subset":
            self.subset: SubsetModel | None = load_subset_model(
                base_dir, config.model, selection, device=device
            )
            self.model = self.subset.model
        else:
            self.subset = None
            self.model = load_model(base_dir, config.model).to(device)
        self.config = config
        self.device = device

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Write canonical-key experts (original ids) into the model (the subset's slots)."""
        if self.subset is None:
            write_experts(self.model, state)
            return
        by_slot = {}
        for key, tensor in state.items():
            layer, expert, projection = parse_expert_key(key)
            by_slot[expert_key(layer, self.subset.slot_of(layer, expert), projection)] = tensor
        write_experts(self.model, by_slot)

    def state(self) -> dict[str, torch.Tensor]:
        if self.subset is None:
            return read_experts(self.model, self.selection)
        return subset_expert_state(self.subset)

    def trainer(self) -> SparseTrainer:
        if self.subset is None:
            return SparseTrainer(self.model, self.selection, self.training, device=self.device)
        return SparseTrainer(self.subset, None, self.training, device=self.device)

    def view_loss(self, sample: EvalSample) -> float:
        return heldout_loss(self.model, sample.domain)


def _run_distributed(
    config: DomainConfig,
    trainee: _Trainee,
    loaders: Sequence[Iterator[torch.Tensor]],
    *,
    inner_steps: int,
    cycles: int,
    measure: Measure,
    sample: EvalSample,
) -> list[CyclePoint]:
    """N miners per cycle from the current global, merged by the outer optimizer."""
    merge = config.merge
    global_state = trainee.state()
    outer = OuterOptimizer(global_state, lr=merge.outer_lr, momentum=merge.momentum, nesterov=merge.nesterov)
    points, tokens = [], 0
    moments: list[dict[str, torch.Tensor] | None] = [None] * len(loaders)  # each miner's AdamW state
    for cycle in range(cycles):
        start = time.perf_counter()
        local_states, losses = [], []
        for miner, loader in enumerate(loaders):
            trainee.load(global_state)
            trainer = trainee.trainer()
            if moments[miner] is not None and moments_may_carry(config.training):
                trainer.load_optimizer_moments(moments[miner])  # as the miner does (DiLoCo's inner state)
            result = trainer.train(loader, inner_steps, progress=False)
            moments[miner] = trainer.state_dict()
            local_states.append(trainer.finish())
            losses.extend(result.losses)
            tokens += result.tokens
        global_state = outer.step(local_states, clip_norm=merge.clip_norm)
        train_s = time.perf_counter() - start
        trainee.load(global_state)
        view = trainee.view_loss(sample)
        points.append(_point(cycle, measure(global_state), view, losses, tokens, train_s))
        _print_point("distributed", points[-1])
    return points


def _run_central(
    trainee: _Trainee,
    loader: Iterator[torch.Tensor],
    *,
    steps_per_cycle: int,
    cycles: int,
    measure: Measure,
    sample: EvalSample,
    arm: str,
) -> list[CyclePoint]:
    """One trainer on all the data for ``steps_per_cycle`` steps a cycle, no outer step."""
    trainer = trainee.trainer()
    points, tokens = [], 0
    for cycle in range(cycles):
        start = time.perf_counter()
        result = trainer.train(loader, steps_per_cycle, progress=False)
        tokens += result.tokens
        train_s = time.perf_counter() - start
        view = trainee.view_loss(sample)
        points.append(_point(cycle, measure(trainee.state()), view, list(result.losses), tokens, train_s))
        _print_point(arm, points[-1])
    trainer.finish()
    return points


def _point(
    cycle: int,
    losses_full: tuple[float, float],
    view: float,
    losses: list[float],
    tokens: int,
    train_s: float,
) -> CyclePoint:
    return CyclePoint(
        cycle=cycle,
        domain_loss=losses_full[0],
        general_loss=losses_full[1],
        trainer_view_domain_loss=view,
        train_loss=sum(losses) / max(len(losses), 1),
        tokens=tokens,
        train_s=train_s,
    )


def _print_point(arm: str, point: CyclePoint) -> None:
    print(f"{arm:11s} cycle={point.cycle} domain={point.domain_loss:.4f} general={point.general_loss:.4f} "
          f"view={point.trainer_view_domain_loss:.4f} train_loss={point.train_loss:.4f} tokens={point.tokens:,d} train_s={point.train_s:.1f}", flush=True)  # fmt: skip


# -- the run -------------------------------------------------------------------------------------


def _run(
    args: argparse.Namespace, config: DomainConfig, device: torch.device, cache_dir: Path
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = build_domain_data(config.data, cache_dir=cache_dir / "data", model=config.model)
    timings["data_s"] = time.perf_counter() - start
    base_dir = cache_dir / "base"
    start = time.perf_counter()
    model, revision = owner_base(
        config, data, base_dir, steps=args.pretrain_steps, batch_size=args.pretrain_batch_size
    )
    model = model.to(device)
    timings["pretrain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    selection = owner_selection(config, model, data, base_dir, revision).experts_by_layer
    timings["selection_s"] = time.perf_counter() - start
    batch_size = args.eval_batch_size or config.scoring.eval_batch_size
    sample = EvalSample(
        domain=data.heldout_sample(args.seed, args.eval_batches, batch_size),
        general=data.general_sample(args.seed, args.general_batches, batch_size),
    )
    base_state = read_experts(model, selection)
    base_domain, base_general = _measure(model, base_state, sample)
    print(
        f"base        domain={base_domain:.4f} general={base_general:.4f} selection={selection}", flush=True
    )
    inner_steps = args.inner_steps or config.training.inner_steps
    batch = config.training.batch_size

    def measure(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        return _measure(model, state, sample)

    def trainee() -> _Trainee:
        return _Trainee(base_dir, config, selection, residency=residency, device=device)

    seed = config.training.seed
    residency = args.residency or config.training.residency
    base_view = trainee().view_loss(sample)
    print(f"base        trainer view ({residency}) domain={base_view:.4f}", flush=True)
    start = time.perf_counter()
    distributed = _run_distributed(
        config,
        trainee(),
        [data.train_loader(i, args.miners, batch, seed=seed) for i in range(args.miners)],
        inner_steps=inner_steps,
        cycles=args.cycles,
        measure=measure,
        sample=sample,
    )
    timings["distributed_s"] = time.perf_counter() - start
    start = time.perf_counter()
    accumulate = args.miners * config.training.grad_accum_steps
    synchronous = config.training.model_copy(update={"grad_accum_steps": accumulate})
    central = _run_central(
        _Trainee(base_dir, config, selection, residency=residency, device=device, training=synchronous),
        data.train_loader(0, 1, batch, seed=seed),
        steps_per_cycle=inner_steps,
        cycles=args.cycles,
        measure=measure,
        sample=sample,
        arm="central",
    )
    timings["central_s"] = time.perf_counter() - start
    sequential: list[CyclePoint] = []
    if args.sequential:
        start = time.perf_counter()
        sequential = _run_central(
            trainee(),
            data.train_loader(0, 1, batch, seed=seed),
            steps_per_cycle=args.miners * inner_steps,
            cycles=args.cycles,
            measure=measure,
            sample=sample,
            arm="sequential",
        )
        timings["sequential_s"] = time.perf_counter() - start
    setup_record = {
        "miners": args.miners,
        "cycles": args.cycles,
        "inner_steps": inner_steps,
        "batch_size": batch,
        "sequence_length": config.data.sequence_length,
        "residency": residency,
        "central": f"{inner_steps} steps/cycle at batch {args.miners} x {batch} (grad accumulation)",
        "sequential": f"{args.miners * inner_steps} steps/cycle at batch {batch}"
        if args.sequential
        else None,
        "pretrain": {
            "steps": args.pretrain_steps,
            "batch_size": args.pretrain_batch_size,
            "lr": PRETRAIN["lr"],
            "mixture": pretrain_mixture(data),
        },
        "outer": config.merge.model_dump(mode="json"),
        "inner": config.training.model_dump(mode="json"),
        "eval": {
            "seed": args.seed,
            "domain_batches": args.eval_batches,
            "general_batches": args.general_batches,
            "batch_size": batch_size,
        },
    }
    base = {"domain_loss": base_domain, "general_loss": base_general, "trainer_view_domain_loss": base_view}
    return _summarise(setup_record, selection, model, base, distributed, central, sequential, timings)


def _relative(new: float, old: float) -> float:
    return (new - old) / old


def _summarise(
    setup_record: dict[str, Any],
    selection: dict[int, list[int]],
    model: nn.Module,
    base: dict[str, float],
    distributed: list[CyclePoint],
    central: list[CyclePoint],
    sequential: list[CyclePoint],
    timings: dict[str, float],
) -> dict[str, Any]:
    base_domain, base_general = base["domain_loss"], base["general_loss"]
    dist_final, central_final = distributed[-1], central[-1]

    def ratio_to(baseline: list[CyclePoint]) -> float | None:
        drop = base_domain - baseline[-1].domain_loss
        return (base_domain - dist_final.domain_loss) / drop if baseline and drop > 0 else None

    ratio = ratio_to(central)
    beside: dict[str, Any] = {}
    if sequential:
        beside = {
            "sequential": [_as_dict(p) for p in sequential],
            "domain_loss_reduction_ratio_vs_sequential": ratio_to(sequential),
            "domain_reduction_sequential": -_relative(sequential[-1].domain_loss, base_domain),
            "general_drift_sequential": _relative(sequential[-1].general_loss, base_general),
        }
    return {
        "setup": setup_record,
        "model": {
            "model_type": model.config.model_type,
            "total_params": sum(p.numel() for p in model.parameters()),
            "selected_experts": sum(len(e) for e in selection.values()),
        },
        "selection": {str(layer): experts for layer, experts in selection.items()},
        "base": base,
        "distributed": [_as_dict(p) for p in distributed],
        "central": [_as_dict(p) for p in central],
        "train_tokens_distributed": dist_final.tokens,
        "train_tokens_central": central_final.tokens,
        "domain_loss_reduction_ratio": ratio,
        "domain_reduction_distributed": -_relative(dist_final.domain_loss, base_domain),
        "domain_reduction_central": -_relative(central_final.domain_loss, base_domain),
        "general_drift_distributed": _relative(dist_final.general_loss, base_general),
        "general_drift_central": _relative(central_final.general_loss, base_general),
        **beside,
        "timings_s": timings,
        "targets": {
            f"domain_loss_reduction_ratio_ge_{TARGET_RATIO}": ratio is not None and ratio >= TARGET_RATIO
        },
    }


def _as_dict(point: CyclePoint) -> dict[str, Any]:
    return {name: getattr(point, name) for name in CyclePoint.__slots__}


def _report(result: dict[str, Any]) -> None:
    ratio = result["domain_loss_reduction_ratio"]
    print(f"device={result['device']} miners={result['setup']['miners']} cycles={result['setup']['cycles']} "
          f"H={result['setup']['inner_steps']} tokens distributed={result['train_tokens_distributed']:,d} "
          f"central={result['train_tokens_central']:,d}")  # fmt: skip
    print(f"domain loss: base {result['base']['domain_loss']:.4f} -> distributed "
          f"{result['distributed'][-1]['domain_loss']:.4f} ({-result['domain_reduction_distributed']:+.2%}), "
          f"central {result['central'][-1]['domain_loss']:.4f} ({-result['domain_reduction_central']:+.2%})")  # fmt: skip
    print(
        f"domain_loss_reduction_ratio {'n/a (central did not improve)' if ratio is None else f'{ratio:.3f}'}"
    )
    if "sequential" in result:
        seq = result["domain_loss_reduction_ratio_vs_sequential"]
        print(f"sequential {result['sequential'][-1]['domain_loss']:.4f} "
              f"({-result['domain_reduction_sequential']:+.2%}); ratio vs sequential "
              f"{'n/a' if seq is None else f'{seq:.3f}'} (reported beside, no target)")  # fmt: skip
    print(f"general_drift distributed {result['general_drift_distributed']:+.3%} "
          f"central {result['general_drift_central']:+.3%}")  # fmt: skip
    print("timings " + " ".join(f"{k}={v:.1f}" for k, v in result["timings_s"].items()))
    for name, ok in result["targets"].items():
        print(f"target {name} {'PASS' if ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    return run_cached("distributed_vs_central", _parse(argv), _run, _report)


if __name__ == "__main__":
    sys.exit(main())
