"""The one entry point behind ``neurons/miner.py`` and ``neurons/validator.py``.

Parse flags, load the domain and the selection, open the chain and the store, build the node
context, run the role's loop. Failures a person must fix print one line on stderr (exit 1).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from connito.config import DomainConfig, config_digest, load_domain_config
from connito.errors import ChainError, ConfigError, ConnitoError, FatalNodeError, StoreError
from connito.hub.base import is_commit_sha
from connito.hub.metered import MeteredStore
from connito.ml.distributed import Distributed, barrier, init_distributed
from connito.ml.selection_record import load_domain_selection
from connito.node.context import NodeContext, load_node_data, open_store
from connito.node.metrics import NodeMetrics, open_wandb
from connito.node.neuron_cli import NeuronArgs, configure_logging, open_chain, parse_args, resolve_args
from connito.node.neuron_flags import Role
from connito.node.startup_checks import check_selection_matches_model
from connito.node.versioning import require_current_protocol
from connito.protocol.version import PROTOCOL_VERSION

if TYPE_CHECKING:  # imported where used: a miner does not load the validator's modules
    from connito.node.miner import Miner
    from connito.node.validator import Validator

logger = logging.getLogger(__name__)

__all__ = ["main", "build_context", "open_metrics"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _base_dir(args: NeuronArgs, config: DomainConfig) -> Path:
    if args.model_path is not None:
        return args.model_path
    if config.model.id is None:
        raise ConfigError(
            "an inline or library model needs --model.path (a save_pretrained folder)", field="--model.path"
        )
    if Path(config.model.id).is_dir():
        return Path(config.model.id)
    from connito.hub.models import snapshot_base_model

    return snapshot_base_model(config.model.id, config.model.revision)


def _hub_repo(args: NeuronArgs, config: DomainConfig, hotkey: str) -> str:
    if args.hub_repo is not None:
        return args.hub_repo
    if args.hub == "hf":
        raise ConfigError("uploading to the Hub needs --hub.repo NAMESPACE/NAME", field="--hub.repo")
    return f"{args.role}s/{hotkey}"


def open_metrics(args: NeuronArgs, config: DomainConfig, hotkey: str) -> NodeMetrics:
    """The neuron's metrics: served with ``--metrics.port``, mirrored to W&B with ``--wandb.project``.

    Raises:
        ConfigError: the port cannot be bound, or wandb is not installed.
    """
    metrics = NodeMetrics(args.role, hotkey=hotkey, domain=config.name)
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, addr=args.metrics_addr)
    if args.wandb_project is not None:
        run_config = {"role": args.role, "hotkey": hotkey, "domain": config.name, "netuid": args.netuid,
                      "config_digest": config_digest(config)}  # fmt: skip
        name = f"{args.role}-{hotkey[:8]}"
        metrics.sink = open_wandb(
            project=args.wandb_project, entity=args.wandb_entity, name=name, config=run_config
        )
    metrics.count_log_records()  # one neuron per process, so the process's log lines are its own
    return metrics


def build_context(args: NeuronArgs, config: DomainConfig, chain) -> NodeContext:
    """Everything a neuron needs, from its flags and the domain config."""
    assert args.workdir is not None and chain.hotkey is not None
    if args.selection is None:
        raise ConfigError("--selection is required (the owner's SELECTION.json)", field="--selection")
    selection = load_domain_selection(args.selection, config)
    base_dir = _base_dir(args, config)
    check_selection_matches_model(selection, selection_path=args.selection, config=config, base_dir=base_dir)
    metrics = open_metrics(args, config, chain.hotkey)
    cache = args.data_cache or args.workdir / "cache"
    args.workdir.mkdir(parents=True, exist_ok=True)
    hub_model = config.model.id is not None and not Path(config.model.id).exists()
    if hub_model and not is_commit_sha(config.model.revision):
        logger.warning(
            "model.revision %r is a branch, not a commit: nodes may load different weights; run connito pin",
            config.model.revision,
        )
    if args.role == "validator" and not args.eval_private_data:
        logger.warning(
            "no --eval.private-data: scoring on the public held-out split, which miners can train on"
        )
    return NodeContext(
        config=config,
        selection=selection,
        chain=chain,
        store=MeteredStore(
            open_store(args.hub, args.hub_path, private=args.hub_private), on_bytes=metrics.add_store_bytes
        ),
        hotkey=chain.hotkey,
        base_dir=base_dir,
        workdir=args.workdir,
        data=load_node_data(config, cache, private=args.eval_private_data),
        device=_device(args.device),
        hub_repo=_hub_repo(args, config, chain.hotkey),
        metrics=metrics,
        keep_cycles=args.keep_cycles,
    )


def main(role: Role, argv: list[str] | None = None) -> int:
    args = parse_args(role, argv)
    configure_logging(args)
    if not args.progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # the Hub's download bars too, not only connito's
    try:
        config = load_domain_config(args.config)
        args = resolve_args(args, config)
        dist = (
            init_distributed(args.training_strategy, device=args.device)
            if role == "miner"
            else Distributed.single()
        )
        if not dist.is_main:  # one metrics endpoint and one W&B run per miner: rank 0's
            args = dataclasses.replace(args, metrics_port=None, wandb_project=None, wandb_entity=None)
        chain = open_chain(args)
        weights_version = require_current_protocol(chain)
        logger.info(
            "%s start domain=%s netuid=%s config_digest=%s protocol_version=%d weights_version=%d",
            role,
            config.name,
            args.netuid,
            config_digest(config)[:12],
            PROTOCOL_VERSION,
            weights_version,
        )
        torch.set_num_threads(max(1, torch.get_num_threads()))
        ctx = build_context(args, config, chain)
        if dist.is_distributed:
            ctx = dataclasses.replace(ctx, device=dist.device)
            barrier(dist)  # every rank has built its data in the shared workdir before rank 0 sweeps it
        elif args.eval_devices:  # the resident model lives on the first evaluation device
            ctx = dataclasses.replace(ctx, device=torch.device(args.eval_devices[0]))
    except (ConfigError, ChainError, StoreError, FatalNodeError) as exc:
        sys.stderr.write(f"{role}: {' '.join(str(exc).split())}\n")
        return 1
    try:
        node = _build_node(role, args, ctx, dist)
    except ConnitoError as exc:  # e.g. a corrupt state file: one line naming it, the file untouched
        sys.stderr.write(f"{role}: {' '.join(str(exc).split())}\n")
        ctx.metrics.close()
        return 1
    if node is None:
        ctx.metrics.close()
        return 1
    try:
        return node.run(until_cycle=args.until_cycle)
    except FatalNodeError as exc:  # a fault retrying cannot heal: one line, never a traceback loop
        logger.error("%s stopped: %s", role, exc)
        sys.stderr.write(f"{role}: {' '.join(str(exc).split())}\n")
        return 1
    except KeyboardInterrupt:
        logger.info("%s stopped", role)
        return 0
    finally:
        ctx.metrics.close()


def _build_node(
    role: Role, args: NeuronArgs, ctx: NodeContext, dist: Distributed
) -> Miner | Validator | None:
    """The role's neuron, resumed from its workdir (None: a one-line error was printed)."""
    node: Miner | Validator
    if role == "miner":
        from connito.node.miner import Miner

        node = Miner(ctx, poll_s=args.poll_s, progress_bars=args.progress and dist.is_main, dist=dist)
    else:
        from connito.library import Library
        from connito.node.validator import Validator

        try:
            library = Library(args.library) if args.library is not None else None
        except (ConnitoError, OSError) as exc:  # a folder that cannot be made, or not a library index
            sys.stderr.write(f"{role}: --library {args.library}: {' '.join(str(exc).split())}\n")
            return None
        node = Validator(
            ctx,
            poll_s=args.poll_s,
            progress_bars=args.progress,
            library=library,
            eval_devices=args.eval_devices,
        )
    return node


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))  # type: ignore[arg-type]
