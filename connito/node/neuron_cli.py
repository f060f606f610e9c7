"""Command line of the neurons: bittensor's dotted flags plus connito's own, parsed once.

bittensor 11 no longer parses CLI arguments (``bt.Config`` was removed: "pass arguments
directly"), so this is plain argparse with the names subnet operators already type:
``--netuid``, ``--subtensor.network``, ``--subtensor.chain_endpoint``, ``--wallet.name``,
``--wallet.hotkey``, ``--wallet.path``, ``--logging.debug``, ``--logging.trace``. Usage errors
exit 2 (argparse); everything else is left to ``main()``. Flags hold operator knobs only;
protocol parameters live in the domain YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from connito.errors import ConfigError

if TYPE_CHECKING:
    from connito.chain.base import Chain
    from connito.config import DomainConfig

__all__ = [
    "NETWORKS",
    "DEFAULT_WALLET_PATH",
    "NeuronArgs",
    "build_parser",
    "parse_args",
    "resolve_args",
    "configure_logging",
    "open_chain",
]

logger = logging.getLogger(__name__)

Role = Literal["miner", "validator"]
NETWORKS = ("finney", "test", "local", "archive", "devnet")  # bittensor 11's named networks
DEFAULT_NETWORK = "finney"
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
DEFAULT_WORKDIR_ROOT = "~/.connito"
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

    @property
    def subtensor_network(self) -> str:
        """What the SDK dials: the explicit endpoint if given, else the network name or URL."""
        return self.chain_endpoint or self.network


def build_parser(role: Role) -> argparse.ArgumentParser:
    """The argument parser of one neuron role (the flag set is shared; only the text differs)."""
    parser = argparse.ArgumentParser(
        prog=f"neurons/{role}.py",
        description=f"connito {role}: sparse MoE expert adaptation on a Bittensor subnet.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        required=True,
        help="domain YAML file (path; required): model, data, selection, cycle and scoring rules",
    )
    parser.add_argument(
        "--netuid",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help="subnet uid (integer); default: the netuid in the domain YAML",
    )
    _add_subtensor_args(parser)
    _add_wallet_args(parser)
    _add_store_args(parser, role)
    _add_logging_args(parser)
    _add_run_args(parser)
    _add_metrics_args(parser)
    _add_parallel_args(parser, role)
    return parser


def _add_parallel_args(parser: argparse.ArgumentParser, role: Role) -> None:
    group = parser.add_argument_group("several GPUs")
    if role == "miner":
        group.add_argument(
            "--training.strategy",
            dest="training_strategy",
            choices=("auto", "single", "ddp", "fsdp"),
            default="auto",
            help="under accelerate launch / torchrun: ddp replicates the model, fsdp also shards the frozen "
            "model (full residency); auto is ddp with several processes, else single (default auto)",
        )
    else:
        group.add_argument(
            "--eval.devices",
            dest="eval_devices",
            type=_device_list,
            metavar="DEV,DEV",
            default=None,
            help="score submissions on one model replica per device, e.g. cuda:0,cuda:1 "
            "(comma-separated; default: none, one model on --device)",
        )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument(
        "--selection",
        type=Path,
        metavar="PATH",
        default=None,
        help="the owner's expert selection JSON for this domain (path; required to run)",
    )
    group.add_argument(
        "--model.path",
        dest="model_path",
        type=Path,
        metavar="DIR",
        default=None,
        help="local folder of the base model (save_pretrained layout); default: fetch the YAML's model.id",
    )
    group.add_argument(
        "--data.cache",
        dest="data_cache",
        type=Path,
        metavar="DIR",
        default=None,
        help="data, tokenizer and token cache folder; default: WORKDIR/cache",
    )
    group.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda if available), cpu, cuda, cuda:N (default auto)",
    )
    group.add_argument(
        "--until-cycle",
        dest="until_cycle",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help="exit after cycle N completes (default: run forever)",
    )
    group.add_argument(
        "--poll",
        dest="poll_s",
        type=float,
        metavar="SECONDS",
        default=2.0,
        help="seconds between chain polls (default 2.0; a block is 12 s on finney)",
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (flag; default: shown)",
    )


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
        wandb_project=ns.wandb_project,
        wandb_entity=ns.wandb_entity,
        library=ns.library if role == "validator" else None,
        training_strategy=ns.training_strategy if role == "miner" else "auto",
        eval_devices=(ns.eval_devices or ()) if role == "validator" else (),
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


# Flag groups -----------------------------------------------------------------------------------


def _add_subtensor_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("subtensor")
    group.add_argument(
        "--subtensor.network",
        dest="subtensor_network",
        metavar="NETWORK",
        type=_network,
        default=DEFAULT_NETWORK,
        help=f"chain to join: one of {', '.join(NETWORKS)} (local = ws://127.0.0.1:9944 or $BT_CHAIN_ENDPOINT), "
        "or a ws:// / wss:// URL (default: %(default)s)",
    )
    group.add_argument(
        "--subtensor.chain_endpoint",
        dest="subtensor_chain_endpoint",
        metavar="URL",
        type=_endpoint,
        default=None,
        help="ws:// or wss:// URL of a subtensor node; overrides --subtensor.network (default: none)",
    )
    group.add_argument(
        "--chain",
        type=_local_spec("--chain"),
        default=None,
        metavar="local:PATH",
        help="use the embedded LocalChain ledger file at PATH instead of subtensor (default: none, use subtensor)",
    )


def _add_wallet_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("wallet")
    group.add_argument(
        "--wallet.name",
        dest="wallet_name",
        metavar="NAME",
        default="default",
        help="coldkey wallet name (string; default: %(default)s)",
    )
    group.add_argument(
        "--wallet.hotkey",
        dest="wallet_hotkey",
        metavar="NAME",
        default="default",
        help="hotkey name inside the wallet, signs every write (string; default: %(default)s)",
    )
    group.add_argument(
        "--wallet.path",
        dest="wallet_path",
        metavar="PATH",
        default=DEFAULT_WALLET_PATH,
        help="directory holding wallets (path; default: %(default)s)",
    )


def _add_store_args(parser: argparse.ArgumentParser, role: Role) -> None:
    group = parser.add_argument_group("checkpoint store and state")
    group.add_argument(
        "--hub",
        type=_hub_spec,
        default=("hf", None),
        metavar="{hf,local:PATH}",
        help="checkpoint store: hf (the Hugging Face Hub, $HF_ENDPOINT / $HF_TOKEN) or local:PATH (a directory store) (default: hf)",
    )
    uploader = (
        "the miner's checkpoints" if role == "miner" else "the merged global expert state (lead validator)"
    )
    group.add_argument(
        "--hub.repo",
        dest="hub_repo",
        metavar="OWNER/NAME",
        default=None,
        help=f"HF repo id (owner/name) for uploading {uploader} (default: none)",
    )
    group.add_argument(
        "--hub.private",
        dest="hub_private",
        action="store_true",
        help="create the HF repo private (flag; default: public)",
    )
    group.add_argument(
        "--workdir",
        type=Path,
        metavar="PATH",
        default=None,
        help=f"state folder (path) for crash-safe {role} state (default: {DEFAULT_WORKDIR_ROOT}/<wallet>/<hotkey>/netuid<N>/{role})",
    )

    if role == "validator":
        group.add_argument(
            "--library",
            type=Path,
            metavar="PATH",
            default=None,
            help="expert library folder: record every global version this validator publishes or adopts "
            "(path; default: none)",
        )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging (to stdout)")
    group.add_argument(
        "--logging.debug",
        dest="logging_debug",
        action="store_true",
        help="connito DEBUG lines (flag; default: INFO)",
    )
    group.add_argument(
        "--logging.trace",
        dest="logging_trace",
        action="store_true",
        help="DEBUG lines from the SDK and transport too (flag; default: off)",
    )


def _add_metrics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics (see docs/metrics.md)")
    group.add_argument(
        "--metrics.port",
        dest="metrics_port",
        type=_port,
        metavar="PORT",
        default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (TCP port; default: off; 0 = off)",
    )
    group.add_argument(
        "--metrics.addr",
        dest="metrics_addr",
        metavar="ADDR",
        default="0.0.0.0",
        help="address the metrics server binds (default: %(default)s, all interfaces; 127.0.0.1 = this machine only)",
    )
    group.add_argument(
        "--wandb.project",
        dest="wandb_project",
        metavar="NAME",
        default=None,
        help="also log metrics to this Weights & Biases project (needs `pip install wandb`; default: off)",
    )
    group.add_argument(
        "--wandb.entity",
        dest="wandb_entity",
        metavar="NAME",
        default=None,
        help="W&B team or user owning the project (default: your W&B default entity)",
    )


# Value parsers (ArgumentTypeError -> usage error, exit 2) --------------------------------------


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _port(value: str) -> int:
    number = _non_negative_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0-65535, got {number}")
    return number


def _endpoint(value: str) -> str:
    if not value.startswith(("ws://", "wss://")) or len(value) <= len("wss://"):
        raise argparse.ArgumentTypeError(f"must be a ws:// or wss:// URL, got {value!r}")
    return value


def _network(value: str) -> str:
    if value in NETWORKS:
        return value
    if value.startswith(("ws://", "wss://")):
        return _endpoint(value)
    raise argparse.ArgumentTypeError(
        f"must be one of {', '.join(NETWORKS)} or a ws:// / wss:// URL, got {value!r}"
    )


def _local_spec(flag: str):  # noqa: ANN202 - returns an argparse type callable
    def parse(value: str) -> Path:
        kind, sep, path = value.partition(":")
        if kind != "local" or not sep or not path:
            raise argparse.ArgumentTypeError(f"{flag} must look like local:PATH, got {value!r}")
        return Path(path).expanduser()

    return parse


def _device_list(value: str) -> tuple[str, ...]:
    devices = tuple(part.strip() for part in value.split(","))
    if not all(devices):
        raise argparse.ArgumentTypeError(f"must be comma-separated devices like cuda:0,cuda:1, got {value!r}")
    return devices


def _hub_spec(value: str) -> tuple[Literal["hf", "local"], Path | None]:
    if value == "hf":
        return "hf", None
    return "local", _local_spec("--hub")(value)


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
