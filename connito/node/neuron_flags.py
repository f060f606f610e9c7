"""The neurons' flag set: the argparse parser, its flag groups and the value parsers behind them.

bittensor 11 no longer parses CLI arguments (``bt.Config`` was removed: "pass arguments
directly"), so this is plain argparse with the names subnet operators already type:
``--netuid``, ``--subtensor.network``, ``--subtensor.chain_endpoint``, ``--wallet.name``,
``--wallet.hotkey``, ``--wallet.path``, ``--logging.debug``, ``--logging.trace``. A bad value is a
usage error (``argparse.ArgumentTypeError``, exit 2). Flags hold operator knobs only; protocol
parameters live in the domain YAML. ``connito.node.neuron_cli`` turns the parsed flags into
``NeuronArgs``; ``scripts/gen_config_docs.py`` walks this parser for the docs' flag tables.

May import: the standard library only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

KEEP_CYCLES_DEFAULT = 4  # --keep.cycles: a restart or a late adoption reaches back fewer cycles

__all__ = [
    "Role",
    "NETWORKS",
    "DEFAULT_NETWORK",
    "DEFAULT_WALLET_PATH",
    "DEFAULT_WORKDIR_ROOT",
    "build_parser",
]

Role = Literal["miner", "validator"]
NETWORKS = ("finney", "test", "local", "archive", "devnet")  # bittensor 11's named networks
DEFAULT_NETWORK = "finney"
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
DEFAULT_WORKDIR_ROOT = "~/.connito"


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

    group.add_argument(
        "--keep.cycles",
        dest="keep_cycles",
        type=_positive_int,
        metavar="N",
        default=KEEP_CYCLES_DEFAULT,
        help="keep the files of the last N cycles in the workdir and in a local:PATH store; older "
        f"checkpoints, globals and decision records are deleted (cycles; default: {KEEP_CYCLES_DEFAULT})",
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
        group.add_argument(
            "--eval.private-data",
            dest="eval_private_data",
            type=Path,
            action="append",
            metavar="PATH",
            default=None,
            help="your private evaluation documents (json/jsonl/txt/parquet with a text field; repeat for "
            "more): Proof-of-Loss is measured on them, which no miner can have trained on (default: none, "
            "the public held-out split, which miners can read)",
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


def _positive_int(value: str) -> int:
    number = _non_negative_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
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
