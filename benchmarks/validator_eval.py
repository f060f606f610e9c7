"""How many submissions per minute can one validator score, and what does swapping experts cost?

A validator keeps one model resident holding the global experts; for each submission it writes the
submission's selected experts into the fused tensors (``write_experts``), evaluates the seeded
scoring sample, and writes the global experts back. This benchmark measures, side by side in one
process on the same model and the same sample:

- ``swap_s``: median time to write one submission's experts in AND restore the global ones;
- ``eval_s``: median time to evaluate one submission (the domain batches plus the general batches
  of the config's scoring section);
- ``swap_fraction = swap_s / eval_s`` (target <= 0.05: swapping must be noise next to evaluating);
- ``reload_s``: median time of what a naive validator does instead, reloading the model from its
  ``save_pretrained`` folder per submission (warm page cache: its best case), and
  ``reload_over_swap``;
- ``submissions_per_minute``: wall clock of one full ``score_submissions`` over all N submissions
  (screening, the global's own evaluation, every swap and evaluation).

Submissions are synthetic: the global experts plus seeded Gaussian noise with per-element std
``lr * sqrt(inner_steps)``, the size of a random walk of H AdamW steps (each moves an element by
about lr). Scoring time does not depend on the values, only on every submission being evaluated,
which the result checks (``evaluated``). Pretraining is skipped: loss values are irrelevant here.

    python benchmarks/validator_eval.py --out validator_eval.json [--config ...] [--submissions 8]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from _common import Timing, add_common_flags, emit, load_config, median_time, metadata, setup, synchronize
from torch import nn

from connito.config import DomainConfig
from connito.data import DomainData, build_domain_data
from connito.ml.modeling import batch_losses, load_model
from connito.ml.moe import read_experts, write_experts
from connito.owner.bootstrap import build_selection, load_base_model
from connito.protocol.checkpoint import tensors_digest
from connito.protocol.scoring import Candidate, SubmissionScore, score_submissions

TARGET_SWAP_FRACTION = 0.05  # swap_s <= this x eval_s


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument(
        "--submissions", type=int, default=8, help="N synthetic submissions scored (default 8)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a save_pretrained base model (default: the config's model)",
    )
    parser.add_argument("--swap-repeats", type=int, default=21, help="timed swap+restore pairs (default 21)")
    parser.add_argument(
        "--eval-repeats", type=int, default=3, help="timed single-submission evaluations (default 3)"
    )
    parser.add_argument("--reload-repeats", type=int, default=3, help="timed model reloads (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed and noise seed (default 0)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.submissions = min(args.submissions, 3)
        args.swap_repeats, args.eval_repeats, args.reload_repeats = 5, 2, 2
    if min(args.submissions, args.swap_repeats, args.eval_repeats, args.reload_repeats) < 1:
        parser.error("--submissions and every --*-repeats must be >= 1")
    return args


def _synthetic_submissions(
    global_state: dict[str, torch.Tensor], count: int, *, std: float, seed: int
) -> list[Candidate]:
    """``count`` candidates: the global experts plus independent seeded noise of ``std`` per element."""
    candidates = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        state = {
            key: tensor
            + (std * torch.randn(tensor.shape, generator=generator)).to(tensor.device, tensor.dtype)
            for key, tensor in sorted(global_state.items())
        }
        candidates.append(
            Candidate(
                hotkey=f"bench-miner-{index}",
                uid=index + 1,
                commit_block=index,
                tensors_sha256=tensors_digest(state),
                state=state,
            )
        )
    return candidates


def _time_swap(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    candidates: list[Candidate],
    *,
    repeats: int,
    device: torch.device,
) -> Timing:
    """Write one submission's experts in and the global ones back, as score_submissions does."""

    def swap(index: int) -> None:
        write_experts(model, candidates[index % len(candidates)].state)
        write_experts(model, global_state)

    return median_time(swap, repeats=repeats, warmup=3, device=device)


def _time_eval(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    candidates: list[Candidate],
    batches: tuple[list[torch.Tensor], list[torch.Tensor]],
    *,
    repeats: int,
    device: torch.device,
) -> Timing:
    """Evaluate one submission per sample (swap in untimed, restore untimed), as score_submissions does."""
    domain, general = batches
    samples: list[float] = []
    for index in range(1 + repeats):  # the first is warm-up
        write_experts(model, candidates[index % len(candidates)].state)
        synchronize(device)
        start = time.perf_counter()
        batch_losses(model, domain)
        batch_losses(model, general)
        synchronize(device)
        if index >= 1:
            samples.append(time.perf_counter() - start)
        write_experts(model, global_state)
    return Timing(median_s=statistics.median(samples), samples_s=tuple(samples))


def _time_reload(
    folder: Path, config: DomainConfig, candidates: list[Candidate], *, repeats: int, device: torch.device
) -> Timing:
    """A naive validator: load the base model from disk for every submission, then write it in."""

    def reload(index: int) -> None:
        model = load_model(folder, config.model).to(device)
        write_experts(model, candidates[index % len(candidates)].state)
        del model

    return median_time(reload, repeats=repeats, warmup=1, device=device)


def _score_all(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    candidates: list[Candidate],
    batches: tuple[list[torch.Tensor], list[torch.Tensor]],
    config: DomainConfig,
    device: torch.device,
) -> tuple[float, list[SubmissionScore]]:
    synchronize(device)
    start = time.perf_counter()
    _, scores = score_submissions(
        model,
        global_state,
        candidates,
        domain_batches=batches[0],
        general_batches=batches[1],
        config=config.scoring,
    )
    synchronize(device)
    return time.perf_counter() - start, scores


def _prepare(
    config: DomainConfig, args: argparse.Namespace, device: torch.device, cache_dir: Path
) -> tuple[nn.Module, dict[int, list[int]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The resident model (global experts = base experts), its selection, the data and sample."""
    data: DomainData = build_domain_data(config.data, cache_dir=cache_dir, model=config.model)
    model = load_base_model(config, args.model_dir).to(device).eval()
    selection = build_selection(
        config, model, data, model_revision="benchmark", progress=False
    ).experts_by_layer
    scoring = config.scoring
    domain = data.heldout_sample(args.seed, scoring.eval_batches, scoring.eval_batch_size)
    general = (
        data.general_sample(args.seed, scoring.general_batches, scoring.eval_batch_size)
        if scoring.general_batches
        else []
    )
    return model, selection, (domain, general)


def _measure(
    args: argparse.Namespace, config: DomainConfig, device: torch.device, cache_dir: Path, work: Path
) -> dict[str, Any]:
    model, selection, batches = _prepare(config, args, device, cache_dir)
    folder = work / "base"
    model.save_pretrained(folder)
    global_state = read_experts(model, selection)
    noise_std = config.training.lr * math.sqrt(config.training.inner_steps)
    candidates = _synthetic_submissions(global_state, args.submissions, std=noise_std, seed=args.seed)
    swap = _time_swap(model, global_state, candidates, repeats=args.swap_repeats, device=device)
    evaluation = _time_eval(
        model, global_state, candidates, batches, repeats=args.eval_repeats, device=device
    )
    reload = _time_reload(folder, config, candidates, repeats=args.reload_repeats, device=device)
    score_wall_s, scores = _score_all(model, global_state, candidates, batches, config, device)
    restored = read_experts(model, selection)
    selected = sum(len(experts) for experts in selection.values())
    return {
        "model": {
            "model_type": model.config.model_type,
            "total_params": sum(p.numel() for p in model.parameters()),
            "selected_experts": selected,
            "selected_expert_params": sum(t.numel() for t in global_state.values()),
            "submission_bytes": sum(t.numel() * t.element_size() for t in global_state.values()),
        },
        "selection": {str(layer): experts for layer, experts in selection.items()},
        "submissions": len(candidates),
        "noise_std": noise_std,
        "eval_batches": len(batches[0]),
        "general_batches": len(batches[1]),
        "eval_tokens_per_submission": sum(int(b.numel()) for b in batches[0] + batches[1]),
        "swap_s": swap.median_s,
        "eval_s": evaluation.median_s,
        "reload_s": reload.median_s,
        "swap_fraction": swap.median_s / evaluation.median_s,
        "reload_over_swap": reload.median_s / swap.median_s,
        "reload_over_eval": reload.median_s / evaluation.median_s,
        "score_wall_s": score_wall_s,
        "submissions_per_minute": 60.0 * len(candidates) / score_wall_s,
        "evaluated": sum(score.domain_loss is not None for score in scores),
        "outcomes": dict(Counter("accepted" if s.accepted else str(s.reason) for s in scores)),
        "global_restored_exactly": all(torch.equal(restored[k], global_state[k]) for k in global_state),
        "samples_s": {"swap": swap.samples_s, "eval": evaluation.samples_s, "reload": reload.samples_s},
    }


def _report(result: dict[str, Any]) -> None:
    model = result["model"]
    print(f"device={result['device']} model={model['model_type']} params={model['total_params']:,d} "
          f"selected_experts={model['selected_experts']} submission={model['submission_bytes'] / 2**20:.2f} MiB")  # fmt: skip
    print(f"eval sample: {result['eval_batches']} domain + {result['general_batches']} general batches, "
          f"{result['eval_tokens_per_submission']:,d} tokens per submission")  # fmt: skip
    print(f"swap_s    {result['swap_s'] * 1e3:10.3f} ms   (write submission + restore global)")
    print(f"eval_s    {result['eval_s'] * 1e3:10.1f} ms")
    print(f"reload_s  {result['reload_s'] * 1e3:10.1f} ms   (naive: from_pretrained per submission)")
    print(f"swap_fraction    {result['swap_fraction']:.5f}  (target <= {TARGET_SWAP_FRACTION})")
    print(f"reload_over_swap {result['reload_over_swap']:.1f}x")
    print(f"score_submissions: {result['submissions']} in {result['score_wall_s']:.1f} s = "
          f"{result['submissions_per_minute']:.1f} submissions/min; evaluated={result['evaluated']} "
          f"outcomes={result['outcomes']} global_restored_exactly={result['global_restored_exactly']}")  # fmt: skip
    for name, ok in result["targets"].items():
        print(f"target {name} {'PASS' if ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = setup(args)
    config = load_config(args)
    with tempfile.TemporaryDirectory(prefix="connito-validator-eval-") as tmp:
        cache_dir = args.cache_dir if args.cache_dir is not None else Path(tmp) / "cache"
        measured = _measure(args, config, device, cache_dir, Path(tmp))
    result = {**metadata("validator_eval", args, config, device), **measured}
    result["targets"] = {
        f"swap_fraction_le_{TARGET_SWAP_FRACTION}": result["swap_fraction"] <= TARGET_SWAP_FRACTION
    }
    _report(result)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
