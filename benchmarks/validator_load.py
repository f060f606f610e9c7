"""Can one validator evaluate N submissions inside one evaluate window, in bounded memory?

A real ``connito.node.validator.Validator`` on a manual-clock ``LocalChain`` with a ``LocalStore``
evaluates one cycle of N submissions from N registered miner hotkeys. Each submission is the
global experts plus small seeded noise (distinct, inside the ``scoring.update_bound_factor`` bound),
written with ``write_checkpoint``, committed inside the commit phase and uploaded and revealed
inside the reveal phase exactly as ``connito.node.miner`` does. The validator then ticks into the
evaluate phase and does everything a validator does there: observe, download in parallel, verify,
screen copies, score each submission on the cycle's seeded held-out sample, rank and EMA.

Measured, in a fresh subprocess per N (so one N's setup cannot pollute another's memory):

- ``wall_s``: wall clock of that evaluate tick (downloads, verification and scoring), against the
  evaluate phase at the localnet's block time: ``evaluate_window_s`` and ``fits_window``;
- ``peak_rss_bytes``: the process's resident memory at its peak during the evaluate tick (a
  thread samples ``/proc/self/statm``; ``ru_maxrss`` before and after bracket it);
- ``rss_growth_bytes_per_submission`` between the two N, ``payload_bytes`` (one submission's
  ``experts.safetensors``) and ``growth_vs_payload`` (target <= 1.0: memory grows no faster than
  the download cache on disk does).

Pretraining is skipped (the base is built from the config): losses are irrelevant to load.

    python benchmarks/validator_load.py --out validator_load.json [--submissions 64] [--config ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from _common import add_common_flags, emit, load_config, metadata, setup

from connito.config import DomainConfig
from connito.data import build_domain_data

if TYPE_CHECKING:  # the worker imports these; the parent process never needs them
    from bittensor.sp_core import Keypair

    from connito.chain.local import LocalChain
    from connito.hub import LocalStore
    from connito.node.validator import Validator
    from connito.protocol.checkpoint import Manifest

TARGET_GROWTH_VS_PAYLOAD = 1.0  # RSS growth per submission <= this x one submission's payload bytes
DEFAULT_BLOCK_TIME_S = 1.0  # the localnet's block time (connito localnet --block-time default)
SAMPLE_INTERVAL_S = 0.005
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--submissions", type=int, default=64, help="N submissions evaluated (default 64)")
    parser.add_argument(
        "--small-submissions",
        type=int,
        default=None,
        help="the second, smaller N the memory growth is measured against (default N/4; smoke 2)",
    )
    parser.add_argument(
        "--block-time-s",
        type=float,
        default=DEFAULT_BLOCK_TIME_S,
        help=f"seconds per block the evaluate phase is timed against (default {DEFAULT_BLOCK_TIME_S}, the localnet's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the submissions (default 0)")
    # internal: one measurement, run by the parent in a fresh process
    parser.add_argument("--worker-work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_work is not None:
        return args  # the parent checked these
    if args.smoke:
        args.submissions = min(args.submissions, 4)
        args.small_submissions = 2
    if args.small_submissions is None:
        args.small_submissions = max(1, args.submissions // 4)
    if not 1 <= args.small_submissions < args.submissions:
        parser.error("need 1 <= --small-submissions < --submissions")
    if args.block_time_s <= 0:
        parser.error("--block-time-s must be > 0")
    return args


# -- the parent: shared inputs once, then one fresh process per N ----------------------------------


def _prepare(config: DomainConfig, cache_dir: Path, work: Path) -> dict[str, Any]:
    """Warm the data cache, save the base model and the owner's selection for the workers."""
    from connito.ml.modeling import build_model
    from connito.ml.selection_record import save_selection
    from connito.owner.bootstrap import build_selection

    data = build_domain_data(config.data, cache_dir=cache_dir, model=config.model)
    model = build_model(config.model).eval()
    model.save_pretrained(work / "base")
    selection = build_selection(config, model, data, model_revision="benchmark", progress=False).sealed()
    save_selection(selection, work / "selection.json")
    return {
        "model_type": model.config.model_type,
        "total_params": sum(p.numel() for p in model.parameters()),
        "selected_experts": sum(len(e) for e in selection.experts_by_layer.values()),
        "selection": {str(layer): experts for layer, experts in selection.experts_by_layer.items()},
    }


def _worker_command(args: argparse.Namespace, submissions: int, cache_dir: Path, work: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--submissions", str(submissions)]
    command += ["--worker-work", str(work), "--worker-out", str(work / f"worker-{submissions}.json")]
    command += ["--cache-dir", str(cache_dir), "--threads", str(args.threads), "--device", args.device]
    command += ["--seed", str(args.seed), "--block-time-s", str(args.block_time_s)]
    command += ["--smoke"] if args.smoke else ["--config", str(args.config)]
    return command + (["--verbose"] if args.verbose else [])


def _run_worker(args: argparse.Namespace, submissions: int, cache_dir: Path, work: Path) -> dict[str, Any]:
    """One measurement in a fresh process: nothing another N allocated is in its memory."""
    done = subprocess.run(_worker_command(args, submissions, cache_dir, work), capture_output=True, text=True)
    out = work / f"worker-{submissions}.json"
    if done.returncode != 0 or not out.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker N={submissions} failed (exit {done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    added = large["submissions"] - small["submissions"]
    growth = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / added
    payload = large["payload_bytes"]
    return {
        "rss_growth_bytes_per_submission": growth,
        "payload_bytes": payload,
        "growth_vs_payload": growth / payload,
    }


def _report(result: dict[str, Any]) -> None:
    model = result["model"]
    print(f"device={result['device']} model={model['model_type']} params={model['total_params']:,d} "
          f"selected_experts={model['selected_experts']} payload={result['payload_bytes'] / 2**20:.2f} MiB")  # fmt: skip
    for point in result["points"]:
        print(f"N={point['submissions']:3d}  evaluate {point['wall_s']:7.1f} s  "
              f"peak_rss {point['peak_rss_bytes'] / 2**20:8.1f} MiB  (before {point['rss_before_bytes'] / 2**20:.1f} MiB)  "
              f"outcomes={point['outcomes']}")  # fmt: skip
    print(f"evaluate window {result['evaluate_window_s']:.0f} s; N={result['submissions']} took "
          f"{result['wall_s']:.1f} s: fits_window={result['fits_window']}")  # fmt: skip
    print(f"rss growth {result['rss_growth_bytes_per_submission'] / 2**20:.3f} MiB/submission = "
          f"{result['growth_vs_payload']:.3f} x payload (target <= {TARGET_GROWTH_VS_PAYLOAD})")  # fmt: skip
    for name, ok in result["targets"].items():
        print(f"target {name} {'PASS' if ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker_work is not None:
        return _worker(args)
    device = setup(args)
    config = load_config(args)
    with tempfile.TemporaryDirectory(prefix="connito-validator-load-") as tmp:
        work = Path(tmp)
        cache_dir = args.cache_dir if args.cache_dir is not None else work / "cache"
        model = _prepare(config, cache_dir, work)
        points = [_run_worker(args, n, cache_dir, work) for n in (args.small_submissions, args.submissions)]
    large = points[-1]
    window_s = config.cycle.evaluate_blocks * args.block_time_s
    result = {
        **metadata("validator_load", args, config, device),
        "model": model,
        "submissions": large["submissions"],
        "wall_s": large["wall_s"],
        "peak_rss_bytes": large["peak_rss_bytes"],
        "block_time_s": args.block_time_s,
        "evaluate_window_s": window_s,
        "fits_window": large["wall_s"] <= window_s,
        "noise_std": config.training.lr * math.sqrt(config.training.inner_steps),
        **_growth(points[0], large),
        "points": points,
    }
    growth_ok = result["growth_vs_payload"] <= TARGET_GROWTH_VS_PAYLOAD
    result["targets"] = {
        f"growth_vs_payload_le_{TARGET_GROWTH_VS_PAYLOAD}": growth_ok,
        "fits_evaluate_window": result["fits_window"],
    }
    _report(result)
    emit(result, args.out)
    return 0


# -- the worker: one subnet, one cycle, one measured evaluate --------------------------------------


class _RssSampler:
    """A thread reading this process's resident set size every few milliseconds; keeps the peak."""

    def __init__(self) -> None:
        self.peak_bytes = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _noisy_experts(
    global_experts: dict[str, torch.Tensor], index: int, *, std: float, bound: float, seed: int
) -> dict[str, torch.Tensor]:
    """The global experts plus seeded noise of ``std`` per element, clamped to ``+-bound``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    noisy = {}
    for key, tensor in sorted(global_experts.items()):
        noise = (std * torch.randn(tensor.shape, generator=generator)).clamp(-bound, bound)
        noisy[key] = tensor + noise.to(tensor.dtype)
    return noisy


@dataclass(frozen=True, slots=True, kw_only=True)
class _Subnet:
    """One validator and N miner keys on a manual-clock chain, with the store they share."""

    config: DomainConfig
    chain_path: Path
    admin: LocalChain  # without a wallet: it only moves the clock
    store: LocalStore
    keys: dict[str, Keypair]  # "v0" is the validator, "m{i}" the miners
    validator: Validator

    def tick_validator_at(self, block: int) -> None:
        """Move the chain to ``block`` and let the validator do what it does there."""
        from connito.protocol.phases import phase

        self.admin.advance_blocks(block - self.admin.current_block())
        self.validator.tick(block, phase(block, self.config.cycle))

    def write_as(self, name: str, data: bytes) -> None:
        from connito.chain.local import LocalChain

        LocalChain.open(self.chain_path, wallet=self.keys[name]).commit(data)


def _build_subnet(
    args: argparse.Namespace, config: DomainConfig, device: torch.device, work: Path
) -> _Subnet:
    """Genesis with one staked validator and N miners, a LocalStore, and a real Validator."""
    from bittensor.sp_core import Keypair

    from connito.chain.local import LocalChain
    from connito.chain.local_ledger import GenesisNeuron
    from connito.hub import LocalStore
    from connito.ml.selection_record import load_selection
    from connito.node.context import NodeContext
    from connito.node.validator import Validator

    names = ["v0"] + [f"m{i}" for i in range(args.submissions)]
    keys = {name: Keypair.create_from_uri(f"//bench-{name}") for name in names}
    neurons = [
        GenesisNeuron(
            hotkey=keys[n].ss58_address, stake=100.0 if n == "v0" else 0.0, validator_permit=n == "v0"
        )
        for n in names
    ]
    chain_path = work / "chain.sqlite"
    LocalChain.genesis(
        chain_path, netuid=0, seed=args.seed, neurons=neurons, weights_rate_limit=1, commitment_rate_limit=1
    )
    store = LocalStore(work / "hub")
    context = NodeContext(
        config=config,
        selection=load_selection(args.worker_work / "selection.json"),
        chain=LocalChain.open(chain_path, wallet=keys["v0"]),
        store=store,
        hotkey=keys["v0"].ss58_address,
        base_dir=args.worker_work / "base",
        workdir=work / "validator",
        data=build_domain_data(config.data, cache_dir=args.cache_dir, model=config.model),
        device=device,
        hub_repo="nodes/v0",
    )
    return _Subnet(
        config=config,
        chain_path=chain_path,
        admin=LocalChain.open(chain_path),
        store=store,
        keys=keys,
        validator=Validator(context, poll_s=0.0, progress_bars=False),
    )


def _write_submissions(
    args: argparse.Namespace, subnet: _Subnet, work: Path
) -> list[tuple[str, Path, Manifest]]:
    """N distinct checkpoints of the global experts plus noise, written one at a time (bounded setup)."""
    from connito.ml.update_bound import max_weight_change
    from connito.protocol.checkpoint import write_checkpoint

    config, validator = subnet.config, subnet.validator
    selection, global_state = validator.ctx.selection, validator.global_state
    factor = config.scoring.update_bound_factor
    bound = (
        0.5 * max_weight_change(config.training, global_state.experts, factor=factor) if factor else math.inf
    )
    std = config.training.lr * math.sqrt(config.training.inner_steps)  # a random walk of H AdamW steps
    written = []
    for index in range(args.submissions):
        name = f"m{index}"
        manifest = write_checkpoint(
            work / "miners" / name,
            _noisy_experts(global_state.experts, index, std=std, bound=bound, seed=args.seed),
            kind="submission",
            domain=config.name,
            model_id=selection.model_id,
            model_revision=selection.model_revision,
            selection_digest=selection.digest,
            cycle=0,
            global_revision=global_state.revision,
            hotkey=subnet.keys[name].ss58_address,
        )
        written.append((name, work / "miners" / name, manifest))
    return written


def _commit_and_reveal(subnet: _Subnet, submissions: list[tuple[str, Path, Manifest]], cycle: int) -> None:
    """As ``connito.node.miner`` does: commit the digest in the commit phase, upload and reveal after it."""
    from connito.protocol.checkpoint import MANIFEST_FILE
    from connito.protocol.commitments import (
        CommitPayload,
        RevealPayload,
        commit_digest,
        encode_commitment,
        short_digest,
    )
    from connito.protocol.phases import phase_bounds

    config = subnet.config
    commit_first, _ = phase_bounds(cycle, "commit", config.cycle)
    subnet.admin.advance_blocks(commit_first - subnet.admin.current_block())
    for name, _folder, manifest in submissions:
        digest = commit_digest(
            domain=config.name,
            cycle=cycle,
            global_revision=manifest.global_revision,
            hotkey=manifest.hotkey,
            tensors_sha256=manifest.tensors_sha256,
        )
        subnet.write_as(name, encode_commitment(CommitPayload(cycle=cycle, digest=digest)))
    subnet.tick_validator_at(commit_first)  # it sees the commits before the reveals replace them
    reveal_first, _ = phase_bounds(cycle, "reveal", config.cycle)
    subnet.admin.advance_blocks(reveal_first - subnet.admin.current_block())
    for name, folder, _manifest in submissions:
        ref = subnet.store.upload(folder, repo=f"miners/{name}", message=f"cycle {cycle}")
        manifest_sha = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).digest()
        payload = RevealPayload(
            cycle=cycle,
            store_kind=ref.kind,
            repo=ref.repo,
            revision=ref.revision,
            manifest_digest=short_digest(manifest_sha),
        )
        subnet.write_as(name, encode_commitment(payload))
    subnet.tick_validator_at(reveal_first)


def _worker(args: argparse.Namespace) -> int:
    """Build the subnet, play the miners through commit and reveal, measure the validator's evaluate."""
    from connito.protocol.checkpoint import EXPERTS_FILE
    from connito.protocol.phases import phase_bounds

    device = setup(args)
    config = load_config(args)
    work = args.worker_work / f"n{args.submissions}"
    subnet = _build_subnet(args, config, device, work)
    cycle = 0
    subnet.tick_validator_at(phase_bounds(cycle, "train", config.cycle)[0])  # loads model and global
    submissions = _write_submissions(args, subnet, work)
    _commit_and_reveal(subnet, submissions, cycle)
    evaluate_first, _ = phase_bounds(cycle, "evaluate", config.cycle)
    maxrss_before, rss_before = _maxrss_bytes(), _rss_bytes()
    with _RssSampler() as sampler:
        start = time.perf_counter()
        subnet.tick_validator_at(evaluate_first)
        wall_s = time.perf_counter() - start
    maxrss_after = _maxrss_bytes()
    # ru_maxrss rises only when the peak of the whole process so far came during the evaluate tick
    peak = max(sampler.peak_bytes, maxrss_after) if maxrss_after > maxrss_before else sampler.peak_bytes
    rows = subnet.validator.state.results[cycle].scores
    measured = {
        "submissions": args.submissions,
        "wall_s": wall_s,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "maxrss_before_bytes": maxrss_before,
        "maxrss_after_bytes": maxrss_after,
        "payload_bytes": (submissions[0][1] / EXPERTS_FILE).stat().st_size,
        "scored": len(rows),
        "evaluated": sum(r.domain_loss is not None for r in rows),
        "outcomes": dict(Counter("accepted" if r.accepted else str(r.reason) for r in rows)),
    }
    args.worker_out.write_text(json.dumps(measured, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
