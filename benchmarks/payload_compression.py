"""How much smaller is an int8 delta payload, and how much Proof-of-Loss does it cost?

On the localnet's tiny model (the config's inline model pretrained with the localnet owner's
recipe, ``connito.localnet.runner.PRETRAIN``, cached in ``--cache-dir``; experts selected the
owner's way), N miners each train the selected experts from the same global for H inner steps
(``SparseTrainer``, the config's training section, one shard each). Each miner's result is
written twice, side by side, as the miner would upload it: ``fp`` (the experts) and ``int8``
(``training.payload: int8``: the delta from the global, per-row int8 with fp32 scales). Each is
loaded back through the validator's strict loader (decoding against the global) and scored by
``connito.protocol.scoring.score_submissions`` on the same seeded held-out sample. Reported:

- ``payload_ratio = bytes(int8 experts.safetensors) / bytes(fp experts.safetensors)`` in the
  model's dtype (fp32 for the localnet), and ``payload_ratio_vs_bf16`` against the same experts
  written in bf16, the dtype of the real models (the int8 payload does not depend on it);
- ``utility_ratio = sum(int8 utility) / sum(fp utility)`` over the miners, with the utility
  ``L_global - L_submission`` (before the validator's clamp at 0), and its per-miner minimum;
- per miner: both losses, the scorer's verdicts, and how close the decoded delta is to the
  trained one (relative L2 error, cosine);
- median write (encode) and load (verify and decode) times of both encodings.

    python benchmarks/payload_compression.py --out payload_compression.json [--miners 3] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    PRETRAIN,
    add_common_flags,
    median_time,
    owner_base,
    owner_selection,
    pretrain_mixture,
    run_cached,
)

from connito.config import DomainConfig
from connito.data import build_domain_data
from connito.ml.moe import read_experts, write_experts
from connito.ml.selection_record import ExpertSelection
from connito.ml.training import SparseTrainer
from connito.protocol.checkpoint import EXPERTS_FILE, ExpertSpec, tensors_digest, write_checkpoint
from connito.protocol.scoring import Candidate, SubmissionScore, score_submissions
from connito.protocol.strict_loader import load_checkpoint

ENCODINGS = ("fp", "int8")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--miners", type=int, default=3, help="N miners, one shard each (default 3)")
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="H per miner (default: the config's training.inner_steps)",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=PRETRAIN["steps"],
        help=f"base pretraining steps (default {PRETRAIN['steps']}, the localnet's)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help="held-out batches scored (default: scoring.eval_batches)",
    )
    parser.add_argument(
        "--repeats", type=int, default=21, help="timed writes and loads per encoding (default 21)"
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.miners, args.pretrain_steps, args.repeats = min(args.miners, 2), 10, 2
    if min(args.miners, args.pretrain_steps, args.repeats) < 1:
        parser.error("--miners, --pretrain-steps and --repeats must be >= 1")
    return args


# -- one miner, two payloads -------------------------------------------------------------------


def _train_miner(
    model, global_experts, selection: dict[int, list[int]], config: DomainConfig, loader, steps: int
) -> dict[str, torch.Tensor]:
    write_experts(model, global_experts)
    trainer = SparseTrainer(model, selection, config.training)
    trainer.train(loader, steps, progress=False)
    experts = trainer.finish()
    write_experts(model, global_experts)  # the scorer's model holds the global on entry
    return experts


def _write(
    folder: Path, experts, global_experts, selection: ExpertSelection, config, encoding: str, revision: str
):
    return write_checkpoint(
        folder,
        experts,
        kind="submission",
        domain=config.name,
        model_id=selection.model_id,
        model_revision=selection.model_revision,
        selection_digest=selection.digest,
        cycle=0,
        global_revision=revision,
        hotkey="bench-miner",
        encoding=encoding,
        base=global_experts,
    )


def _load(folder: Path, selection: ExpertSelection, global_experts, revision: str, max_bytes: int):
    expected = {key: ExpertSpec(tuple(t.shape), t.dtype) for key, t in global_experts.items()}
    _, state = load_checkpoint(
        folder,
        selection=selection,
        expected=expected,
        max_bytes=max_bytes,
        base=global_experts,
        base_revision=revision,
    )
    return state


def _delta_fidelity(global_experts, trained, decoded) -> tuple[float, float]:
    """(relative L2 error, cosine) of the decoded pseudo-gradient against the trained one."""
    true = torch.cat([(trained[k].float() - global_experts[k].float()).reshape(-1) for k in sorted(trained)])
    got = torch.cat([(decoded[k].float() - global_experts[k].float()).reshape(-1) for k in sorted(trained)])
    error = float((got - true).norm() / true.norm())
    cosine = float(got @ true / (got.norm() * true.norm()))
    return error, cosine


def _score(
    model, global_experts, state, name: str, sample, config
) -> tuple[tuple[float, float], SubmissionScore]:
    candidate = Candidate(
        hotkey=name, uid=0, commit_block=0, tensors_sha256=tensors_digest(state), state=state
    )
    (global_domain, global_general), (score,) = score_submissions(
        model,
        global_experts,
        [candidate],
        domain_batches=sample[0],
        general_batches=sample[1],
        config=config.scoring,
    )
    return (global_domain, global_general), score


def _verdict(score: SubmissionScore, global_domain: float) -> dict[str, Any]:
    return {
        "domain_loss": score.domain_loss,
        "general_loss": score.general_loss,
        "utility": global_domain - score.domain_loss if score.domain_loss is not None else None,
        "accepted": score.accepted,
        "reason": score.reason,
    }


def _run(
    args: argparse.Namespace, config: DomainConfig, device: torch.device, cache_dir: Path
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = build_domain_data(config.data, cache_dir=cache_dir / "data", model=config.model)
    base_dir = cache_dir / "base"
    model, revision = owner_base(config, data, base_dir, steps=args.pretrain_steps)
    model = model.to(device)
    selection = owner_selection(config, model, data, base_dir, revision)
    by_layer = selection.experts_by_layer
    timings["bootstrap_s"] = time.perf_counter() - start
    global_experts = read_experts(model, by_layer)
    global_revision = tensors_digest(global_experts)
    scoring = config.scoring
    batches = args.eval_batches or scoring.eval_batches
    sample = (
        data.heldout_sample(args.seed, batches, scoring.eval_batch_size),
        data.general_sample(args.seed, scoring.general_batches, scoring.eval_batch_size)
        if scoring.general_batches
        else [],
    )
    steps = args.inner_steps or config.training.inner_steps
    print(
        f"base revision={revision[:12]} selection={by_layer} steps={steps} miners={args.miners}", flush=True
    )
    miners: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    global_losses = (math.nan, math.nan)
    with tempfile.TemporaryDirectory(prefix="connito-payload-") as tmp:
        for miner in range(args.miners):
            start = time.perf_counter()
            loader = data.train_loader(
                miner, args.miners, config.training.batch_size, seed=config.training.seed + miner
            )
            trained = _train_miner(model, global_experts, by_layer, config, loader, steps)
            timings[f"train_miner{miner}_s"] = time.perf_counter() - start
            row: dict[str, Any] = {"miner": miner}
            for encoding in ENCODINGS:
                folder = Path(tmp) / f"m{miner}-{encoding}"
                _write(folder, trained, global_experts, selection, config, encoding, global_revision)
                sizes[encoding] = (folder / EXPERTS_FILE).stat().st_size
                state = _load(folder, selection, global_experts, global_revision, scoring.max_payload_bytes)
                global_losses, score = _score(
                    model, global_experts, state, f"m{miner}-{encoding}", sample, config
                )
                row[encoding] = _verdict(score, global_losses[0])
                if encoding == "int8":
                    row["delta_rel_error"], row["delta_cosine"] = _delta_fidelity(
                        global_experts, trained, state
                    )
            row["utility_ratio"] = (
                row["int8"]["utility"] / row["fp"]["utility"] if row["fp"]["utility"] else None
            )
            miners.append(row)
            _print_miner(row)
        bf16 = {key: tensor.to(torch.bfloat16) for key, tensor in trained.items()}
        bf16_base = {key: tensor.to(torch.bfloat16) for key, tensor in global_experts.items()}
        _write(Path(tmp) / "bf16", bf16, bf16_base, selection, config, "fp", global_revision)
        sizes["fp_bf16"] = (Path(tmp) / "bf16" / EXPERTS_FILE).stat().st_size
        timings.update(
            _time_codecs(Path(tmp), trained, global_experts, selection, config, global_revision, args, device)
        )
    fp_total = sum(row["fp"]["utility"] for row in miners)
    int8_total = sum(row["int8"]["utility"] for row in miners)
    ratios = [row["utility_ratio"] for row in miners if row["utility_ratio"] is not None]
    return {
        "setup": {
            "miners": args.miners,
            "inner_steps": steps,
            "batch_size": config.training.batch_size,
            "lr": config.training.lr,
            "residency": "full",
            "selected_experts": sum(len(v) for v in by_layer.values()),
            "expert_dtype": str(next(iter(global_experts.values())).dtype).removeprefix("torch."),
            "pretrain": {**PRETRAIN, "steps": args.pretrain_steps, "mixture": pretrain_mixture(data)},
            "eval": {"batches": batches, "batch_size": scoring.eval_batch_size, "seed": args.seed},
        },
        "payload_bytes": sizes,
        "payload_ratio": sizes["int8"] / sizes["fp"],
        "payload_ratio_vs_bf16": sizes["int8"] / sizes["fp_bf16"],
        "global_domain_loss": global_losses[0],
        "global_general_loss": global_losses[1],
        "utility_ratio": int8_total / fp_total if fp_total else None,
        "utility_ratio_min": min(ratios) if ratios else None,
        "miners_detail": miners,
        "timings_s": timings,
    }


def _time_codecs(
    tmp: Path, trained, global_experts, selection, config, revision, args, device
) -> dict[str, float]:
    """Median write (encode) and load (verify + decode) time of each encoding, same experts."""
    out: dict[str, float] = {}
    for encoding in ENCODINGS:
        folder = tmp / f"timing-{encoding}"
        write = median_time(
            lambda _i, enc=encoding, f=folder: _write(
                f, trained, global_experts, selection, config, enc, revision
            ),
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
        load = median_time(
            lambda _i, f=folder: _load(
                f, selection, global_experts, revision, config.scoring.max_payload_bytes
            ),
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
        out[f"write_{encoding}_s"], out[f"load_{encoding}_s"] = write.median_s, load.median_s
    out["write_int8_over_fp"] = out["write_int8_s"] / out["write_fp_s"]
    out["load_int8_over_fp"] = out["load_int8_s"] / out["load_fp_s"]
    return out


def _print_miner(row: dict[str, Any]) -> None:
    fp, q = row["fp"], row["int8"]
    ratio = row["utility_ratio"]
    print(
        f"miner {row['miner']}: utility fp={fp['utility']:.5f} int8={q['utility']:.5f} "
        f"ratio={'n/a' if ratio is None else f'{ratio:.4f}'} accepted fp={fp['accepted']} int8={q['accepted']} "
        f"delta rel_err={row['delta_rel_error']:.4f} cos={row['delta_cosine']:.6f}",
        flush=True,
    )


def _report(result: dict[str, Any]) -> None:
    sizes = result["payload_bytes"]
    print(
        f"payload bytes fp={sizes['fp']} int8={sizes['int8']} ratio={result['payload_ratio']:.4f} "
        f"({result['setup']['expert_dtype']} experts); against the same experts in bf16 "
        f"({sizes['fp_bf16']} bytes) {result['payload_ratio_vs_bf16']:.4f}"
    )
    print(
        f"Proof-of-Loss utility ratio int8/fp={result['utility_ratio']:.4f} "
        f"(min over miners {result['utility_ratio_min']:.4f}); global loss={result['global_domain_loss']:.4f}"
    )
    timings = result["timings_s"]
    print(
        f"write int8/fp={timings['write_int8_over_fp']:.2f}x load(verify+decode) int8/fp="
        f"{timings['load_int8_over_fp']:.2f}x",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cached("payload_compression", _parse(argv), _run, _report)


if __name__ == "__main__":
    sys.exit(main())
