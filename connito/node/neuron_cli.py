"""Command line of the neurons: the parsed flags as ``NeuronArgs``, then logging, wallet and chain.

``parse_args`` runs the parser of ``connito.node.neuron_flags`` once (usage errors exit 2,
argparse); ``resolve_args`` fills what the domain YAML decides; ``configure_logging`` and
``open_chain`` set up what every neuron needs before its loop. Everything else is left to
``main()``.

May import: connito.errors, connito.node.neuron_flags; connito.config, connito.chain (chain
adapters lazily) and bittensor (lazily, for the wallet).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from connito.errors import ConfigError
from connito.node.neuron_flags import DEFAULT_WORKDIR_ROOT, KEEP_CYCLES_DEFAULT, Role, build_parser

if TYPE_CHECKING:
    from connito.chain.base import Chain
    from connito.config import DomainConfig

__all__ = [
    "NeuronArgs",
    "parse_args",
    "resolve_args",
    "configure_logging",
    "open_chain",
]

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronArgs:
    """Every operator knob of a neuron, as given on the command line.

    ``netuid`` and ``workdir`` may be None until ``resolve_args`` fills them from the domain YAML.
    """

    role: Role
    config: Path
    netuid: int | None
    network: str
    chain_endpoint: str | None
    wallet_name: str
    wallet_hotkey: str
    wallet_path: Path
    local_chain: Path | None  # --chain local:PATH; None means subtensor
    hub: Literal["hf", "local"]
    hub_path: Path | None  # --hub local:PATH
    hub_repo: str | None
    hub_private: bool
    workdir: Path | None
    logging_debug: bool
    logging_trace: bool
    selection: Path | None = None  # the owner's SELECTION.json
    model_path: Path | None = None  # local save_pretrained folder of the base model
    data_cache: Path | None = None  # data and tokenizer cache (default: WORKDIR/cache)
    device: str = "auto"
    until_cycle: int | None = None  # stop after this cycle completes (None: run forever)
    poll_s: float = 2.0
    progress: bool = True
    metrics_port: int | None = None  # --metrics.port; None (or 0 on the command line) = no server
    metrics_addr: str = "0.0.0.0"
    wandb_project: str | None = None  # --wandb.project; None = no W&B logging
    wandb_entity: str | None = None
    library: Path | None = None  # validators: expert library folder to record versions in (None: off)
    training_strategy: str = "auto"  # miners: single | ddp | fsdp across launched processes
    eval_devices: tuple[str, ...] = ()  # validators: one model replica per device (empty: --device only)
    eval_private_data: tuple[Path, ...] = ()  # validators: private evaluation documents
    keep_cycles: int = KEEP_CYCLES_DEFAULT  # --keep.cycles: cycles of files kept on disk

    @property
    def subtensor_network(self) -> str:
        """What the SDK dials: the explicit endpoint if given, else the network name or URL."""
        return self.chain_endpoint or self.network


def parse_args(role: Role, argv: list[str] | None = None) -> NeuronArgs:
    """Parse a neuron's flags; usage errors print to stderr and exit 2."""
    parser = build_parser(role)
    ns = parser.parse_args(argv)
    if ns.wandb_entity is not None and ns.wandb_project is None:
        parser.error("--wandb.entity needs --wandb.project")
    hub, hub_path = ns.hub
    return NeuronArgs(
        role=role,
        config=ns.config,
        netuid=ns.netuid,
        network=ns.subtensor_network,
        chain_endpoint=ns.subtensor_chain_endpoint,
        wallet_name=ns.wallet_name,
        wallet_hotkey=ns.wallet_hotkey,
        wallet_path=Path(ns.wallet_path).expanduser(),
        local_chain=ns.chain,
        hub=hub,
        hub_path=hub_path,
        hub_repo=ns.hub_repo,
        hub_private=ns.hub_private,
        workdir=ns.workdir.expanduser() if ns.workdir is not None else None,
        logging_debug=ns.logging_debug,
        logging_trace=ns.logging_trace,
        selection=ns.selection,
        model_path=ns.model_path,
        data_cache=ns.data_cache,
        device=ns.device,
        until_cycle=ns.until_cycle,
        poll_s=ns.poll_s,
        progress=ns.progress,
        metrics_port=ns.metrics_port or None,
        metrics_addr=ns.metrics_addr,
        keep_cycles=ns.keep_cycles,
        wandb_project=ns.wandb_project,
        wandb_entity=ns.wandb_entity,
        library=ns.library if role == "validator" else None,
        training_strategy=ns.training_strategy if role == "miner" else "auto",
        eval_devices=(ns.eval_devices or ()) if role == "validator" else (),
        eval_private_data=tuple(ns.eval_private_data or ()) if role == "validator" else (),
    )


def resolve_args(args: NeuronArgs, config: DomainConfig) -> NeuronArgs:
    """Apply the precedence flags > YAML for the knobs both can set (netuid), and derive workdir.

    The default workdir follows the bittensor template's layout, so two neurons on one machine
    never share state: ``~/.connito/<wallet>/<hotkey>/netuid<N>/<role>``.
    """
    netuid = args.netuid if args.netuid is not None else config.netuid
    workdir = args.workdir
    if workdir is None:
        workdir = (
            Path(DEFAULT_WORKDIR_ROOT).expanduser()
            / args.wallet_name
            / args.wallet_hotkey
            / f"netuid{netuid}"
            / args.role
        )
    return dataclasses.replace(args, netuid=netuid, workdir=workdir)


def configure_logging(args: NeuronArgs) -> None:
    """Send log lines to stdout, leaving stderr for the one-line failure reason.

    INFO by default; ``--logging.debug`` turns connito to DEBUG; ``--logging.trace`` also lets the
    SDK's transport and websocket chatter through (otherwise held at WARNING).
    """
    level = logging.DEBUG if args.logging_debug or args.logging_trace else logging.INFO
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stdout, force=True)
    third_party = logging.DEBUG if args.logging_trace else logging.WARNING
    for name in ("bittensor", "websockets", "asyncio", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(third_party)


def open_chain(args: NeuronArgs) -> Chain:
    """Open the chain the flags name and read its current block once, so a dead endpoint fails now.

    ``--chain local:PATH`` opens the embedded ledger; otherwise a subtensor node
    (``--subtensor.chain_endpoint`` wins over ``--subtensor.network``), retried with bounded
    backoff (well under a minute when nothing answers). Writes are signed by the wallet's hotkey.

    Raises:
        ConfigError: no netuid, or the wallet's hotkey cannot be loaded.
        ChainError: the chain cannot be reached; the message names the endpoint and the reason.
    """
    wallet = _load_wallet(args)
    if args.local_chain is not None:
        from connito.chain.local import LocalChain

        chain: Chain = LocalChain.open(args.local_chain, wallet=wallet)
        where = f"local:{args.local_chain}"
    else:
        from connito.chain.subtensor import SubtensorChain

        if args.netuid is None:
            raise ConfigError("no netuid: pass --netuid or set netuid in the domain YAML", field="netuid")
        subtensor = SubtensorChain(args.netuid, network=args.subtensor_network, wallet=wallet)
        chain, where = subtensor, subtensor.endpoint
    block = chain.current_block()
    logger.info(
        "chain opened role=%s chain=%s netuid=%s hotkey=%s block=%d",
        args.role,
        where,
        args.netuid,
        chain.hotkey,
        block,
    )
    return chain


def _load_wallet(args: NeuronArgs):  # noqa: ANN202 - bittensor.Wallet, imported lazily
    """The operator's wallet; its hotkey must exist because every write is signed by it."""
    import bittensor as bt

    wallet = bt.Wallet(args.wallet_name, args.wallet_hotkey, path=str(args.wallet_path))
    if not wallet.hotkey_file.exists_on_device():
        raise ConfigError(
            f"hotkey {args.wallet_hotkey!r} of wallet {args.wallet_name!r} not found at {wallet.hotkey_file.path}",
            field="wallet.hotkey",
        )
    return wallet
