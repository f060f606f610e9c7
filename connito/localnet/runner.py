"""``connito localnet``: the whole subnet on one machine, offline, with the real neuron code.

Steps: owner bootstrap (data, tokenizer, a briefly pretrained base MoE, expert selection, all
cached in the workdir), wallets and a LocalChain genesis, a LocalStore under ``DIR/hub``, then
miner, adversary and validator processes for K cycles; finally the owner measures every
published global state on a fixed held-out sample and writes ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import yaml

from connito.config import DomainConfig, load_domain_config, parse_domain_config
from connito.errors import ConfigError
from connito.localnet.adversary import ADVERSARY_KINDS, SYBIL_NOISE
from connito.localnet.private_eval import private_eval_file, write_private_eval
from connito.localnet.report import LocalnetReport, format_cycle_row, render_plot, write_report
from connito.localnet.summary import build_report

logger = logging.getLogger(__name__)

__all__ = ["LocalnetPlan", "run_localnet"]


# document_pools: EMO-style pools (connito.ml.document_pools) so the experts group by domain and
# `connito export` can keep a domain's quarter of them (+62% domain loss without, -0.4% with)
class PretrainRecipe(TypedDict):
    """The keyword arguments of ``connito.owner.bootstrap.pretrain_base`` that fix the localnet's base."""

    steps: int
    batch_size: int
    lr: float
    mixture: dict[str, float]
    document_pools: list[int]


PRETRAIN: PretrainRecipe = {
    "steps": 400,
    "batch_size": 8,
    "lr": 3e-3,
    "mixture": {"english": 0.4, "code": 0.4, "math": 0.2},
    "document_pools": [2, 4, 8],
}
STARTUP_S = 90.0  # seconds before cycle 0 starts: processes import torch and load data and models


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalnetPlan:
    config_path: Path
    workdir: Path
    miners: int
    validators: int
    cycles: int
    adversaries: tuple[str, ...]
    block_time_s: float
    metrics_base_port: int | None = None  # neuron i serves metrics on 127.0.0.1:base+i; None = off


def _plan(args: argparse.Namespace) -> LocalnetPlan:
    adversaries = tuple(a for a in (args.adversaries or "").split(",") if a)
    unknown = [a for a in adversaries if a not in ADVERSARY_KINDS]
    if unknown:
        raise ConfigError(
            f"unknown adversary {unknown[0]!r} (known: {', '.join(ADVERSARY_KINDS)})", field="--adversaries"
        )
    if args.miners < 1 or args.validators < 1 or args.cycles < 1:
        raise ConfigError(
            "need at least one miner, one validator and one cycle", field="--miners/--validators/--cycles"
        )
    neurons = args.miners + args.validators + len(adversaries)
    if args.metrics_base_port < 0 or args.metrics_base_port + neurons - 1 > 65535:
        raise ConfigError(
            f"must be 0 (off) or a TCP port with room for {neurons} neurons below 65536, got {args.metrics_base_port}",
            field="--metrics-base-port",
        )
    if {"copy", "sybil", "replay"} & set(adversaries) and args.miners < 1:
        raise ConfigError(
            "the copy, sybil and replay adversaries need an honest miner", field="--adversaries"
        )
    return LocalnetPlan(
        config_path=args.config,
        workdir=args.workdir,
        miners=args.miners,
        validators=args.validators,
        cycles=args.cycles,
        adversaries=adversaries,
        block_time_s=args.block_time if args.block_time is not None else 1.0,
        metrics_base_port=args.metrics_base_port or None,
    )


def run_localnet(args: argparse.Namespace) -> int:
    plan = _plan(args)
    started = time.monotonic()
    workdir = plan.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_domain_config(plan.config_path)
    base_dir, selection_path = _bootstrap(config, workdir)
    roles = _roles(plan)
    hotkeys = _wallets(workdir, roles)
    config_path = _write_run_config(config, workdir, plan)
    run_config = load_domain_config(config_path)
    _genesis(workdir, run_config, roles, hotkeys, plan)
    private = write_private_eval(workdir, run_config, [n for n, k in roles.items() if k == "validator"])
    processes = _spawn(workdir, config_path, base_dir, selection_path, roles, hotkeys, plan, private=private)
    try:
        _wait(workdir, run_config, plan, processes)
    finally:
        _stop(processes)
    report = build_report(
        workdir=workdir,
        config=run_config,
        base_dir=base_dir,
        selection_path=selection_path,
        roles=roles,
        hotkeys=hotkeys,
        cycles=plan.cycles,
        wall_s=time.monotonic() - started,
    )
    _print_report(report, {h: r for r, h in hotkeys.items()})
    write_report(report, workdir / "report.json")
    render_plot(report, workdir / "report.png")
    print(
        f"report: {workdir / 'report.json'}\nplot:   {workdir / 'report.png'}\nlibrary: {workdir / 'library'}"
    )
    return 0


def _bootstrap(config: DomainConfig, workdir: Path) -> tuple[Path, Path]:
    """Owner: data + tokenizer, a briefly pretrained base, and the expert selection (all cached)."""
    from connito.data import build_domain_data
    from connito.ml.selection_record import load_selection, save_selection
    from connito.owner.bootstrap import PRETRAIN_MARKER, build_selection, pretrain_base

    base_dir = workdir / "base"
    selection_path = workdir / "selection.json"
    print("[owner] building data and tokenizer ...", flush=True)
    data = build_domain_data(config.data, cache_dir=workdir / "cache", model=config.model)
    print(f"[owner] pretraining the base MoE ({PRETRAIN['steps']} steps, cached) ...", flush=True)
    model = pretrain_base(config, data, base_dir, **PRETRAIN)
    revision = json.loads((base_dir / PRETRAIN_MARKER).read_text())["revision"]
    if selection_path.exists():
        selection = load_selection(selection_path)
        if selection.model_revision == revision:
            return base_dir, selection_path
    print("[owner] selecting experts ...", flush=True)
    selection = build_selection(config, model, data, model_revision=revision, progress=False)
    save_selection(selection, selection_path)
    for entry in selection.layers:
        print(f"[owner]   layer {entry.layer}: experts {list(entry.experts)}", flush=True)
    return base_dir, selection_path


def _roles(plan: LocalnetPlan) -> dict[str, str]:
    """Role name -> kind: v0.. (validator), m0.. (miner), adv-<kind> (adversary)."""
    roles = {f"v{i}": "validator" for i in range(plan.validators)}
    roles.update({f"m{i}": "miner" for i in range(plan.miners)})
    for kind in plan.adversaries:
        names = [f"adv-{kind}-{i}" for i in range(len(SYBIL_NOISE))] if kind == "sybil" else [f"adv-{kind}"]
        roles.update({name: kind for name in names})
    return roles


def _wallets(workdir: Path, roles: dict[str, str]) -> dict[str, str]:
    from connito.chain.local_signing import create_wallet

    return {name: create_wallet(workdir / "wallets", name).hotkey.ss58_address for name in roles}


def _write_run_config(config: DomainConfig, workdir: Path, plan: LocalnetPlan) -> Path:
    """The domain config the processes run: cycle 0 starts after the processes have loaded."""
    data = config.model_dump(mode="json")  # a None that switches a check off must survive
    data["cycle"]["genesis_block"] = int(STARTUP_S / plan.block_time_s)
    parse_domain_config(data, path="<localnet>")
    path = workdir / "domain.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _genesis(workdir: Path, config: DomainConfig, roles, hotkeys, plan: LocalnetPlan) -> None:
    from connito.chain.local import LocalChain
    from connito.chain.local_ledger import GenesisNeuron

    for stale in ("nodes", "hub", "logs", "library"):  # a fresh subnet each run; base, selection, cache kept
        shutil.rmtree(workdir / stale, ignore_errors=True)
    ledger = workdir / "chain.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger) + suffix).unlink(missing_ok=True)
    neurons = []
    for name, kind in roles.items():
        is_validator = kind == "validator"
        stake = 1000.0 - 100.0 * int(name[1:]) if is_validator else 0.0
        neurons.append(GenesisNeuron(hotkey=hotkeys[name], stake=stake, validator_permit=is_validator))
    LocalChain.genesis(
        ledger,
        netuid=config.netuid,
        seed=int.from_bytes(os.urandom(4), "big"),
        neurons=neurons,
        block_time_s=plan.block_time_s,
        tempo=config.cycle.cycle_blocks,
        weights_rate_limit=max(1, config.cycle.cycle_blocks // 4),
        commitment_rate_limit=1,
    )


def _neuron_flags(
    workdir: Path,
    config_path: Path,
    base_dir: Path,
    selection_path: Path,
    name: str,
    plan,
    *,
    metrics_port: int | None = None,
    private: bool = False,
) -> list[str]:
    metrics = ["--metrics.port", str(metrics_port), "--metrics.addr", "127.0.0.1"] if metrics_port else []
    return [
        "--config", str(config_path),
        "--chain", f"local:{workdir / 'chain.sqlite'}",
        "--hub", f"local:{workdir / 'hub'}",
        "--wallet.name", name,
        "--wallet.hotkey", "default",
        "--wallet.path", str(workdir / "wallets"),
        "--workdir", str(workdir / "nodes" / name),
        "--selection", str(selection_path),
        "--model.path", str(base_dir),
        "--data.cache", str(workdir / "cache"),
        "--until-cycle", str(plan.cycles - 1),
        "--keep.cycles", str(plan.cycles + 1),  # the report reads every cycle's global and record
        "--poll", str(max(0.2, plan.block_time_s / 2)),
        "--no-progress",
        *metrics,
        *(["--library", str(workdir / "library")] if name.startswith("v") else []),
        *(["--eval.private-data", str(private_eval_file(workdir, name))] if private and name.startswith("v") else []),
    ]  # fmt: skip


def _spawn(
    workdir, config_path, base_dir, selection_path, roles, hotkeys, plan, *, private: bool
) -> dict[str, _Process]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    (workdir / "logs").mkdir(exist_ok=True)
    processes: dict[str, _Process] = {}
    for index, (name, kind) in enumerate(sorted(roles.items(), key=lambda item: item[1] != "validator")):
        port = plan.metrics_base_port + index if plan.metrics_base_port else None
        flags = _neuron_flags(
            workdir, config_path, base_dir, selection_path, name, plan, metrics_port=port, private=private
        )
        if kind in ("validator", "miner"):
            command = [sys.executable, "-m", "connito.node.main", kind, *flags]
        else:
            victim = "m1" if kind == "sybil" and plan.miners > 1 else "m0"
            noise = SYBIL_NOISE[int(name.rsplit("-", 1)[1])] if kind == "sybil" else 0.0
            command = [sys.executable, "-m", "connito.localnet.adversary_main", "--kind", kind, "--noise", str(noise),
                       "--victim-workdir", str(workdir / "nodes" / victim), "--victim-hotkey", hotkeys[victim], *flags]  # fmt: skip
        log = open(workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        processes[name] = process
        metrics = f" metrics=http://127.0.0.1:{port}/metrics" if port else ""
        print(f"[localnet] started {name} ({kind}) pid={process.pid}{metrics}", flush=True)
    return processes


def _wait(workdir: Path, config: DomainConfig, plan: LocalnetPlan, processes: dict[str, _Process]) -> None:
    from connito.chain.local import LocalChain
    from connito.protocol.phases import phase, phase_bounds

    chain = LocalChain.open(workdir / "chain.sqlite")
    _, last_block = phase_bounds(plan.cycles - 1, "merge", config.cycle)
    grace = config.cycle.evaluate_blocks + config.cycle.merge_blocks
    shown = None
    while True:
        block = chain.current_block()
        info = phase(block, config.cycle)
        if (info.cycle, info.phase) != shown:
            shown = (info.cycle, info.phase)
            print(f"[localnet] block {block}: cycle {info.cycle} {info.phase}", flush=True)
        validators_done = all(p.poll() is not None for n, p in processes.items() if n.startswith("v"))
        if validators_done or block > last_block + 1 + grace:  # a loaded machine: let them finish
            return
        for name, process in processes.items():
            if process.poll() not in (None, 0):
                print(f"[localnet] {name} exited with {process.returncode}; see logs/{name}.log", flush=True)
                processes[name] = _Exited(process.returncode)
        time.sleep(max(0.5, plan.block_time_s))


class _Exited:
    """A neuron that already failed: reported once, then left alone."""

    def __init__(self, code: int) -> None:
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


_Process = subprocess.Popen[bytes] | _Exited


def _stop(processes: dict[str, _Process]) -> None:
    for process in processes.values():
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes.values():
        if isinstance(process, subprocess.Popen):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _print_report(report: LocalnetReport, names: dict[str, str]) -> None:
    print(
        f"baseline: domain {report.baseline.domain_val_loss:.4f} general {report.baseline.general_val_loss:.4f}",
        flush=True,
    )
    for row in report.cycles:
        print(format_cycle_row(row, report.baseline, names), flush=True)
    for hotkey, kind in report.adversaries.items():
        print(f"adversary {kind}: {names.get(hotkey, hotkey)}", flush=True)
