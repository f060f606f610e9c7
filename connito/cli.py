"""The ``connito`` command: a verb per job, kebab-case flags, errors turned into one line here.

Exit codes: 0 success, 1 a rejection or failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from connito.errors import ConnitoError

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]


def _add_select(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="measure routing on domain data and write the expert selection JSON")
    p.add_argument("--config", type=Path, default=None, help="domain YAML (required unless --check)")
    p.add_argument(
        "--out", type=Path, default=None, help="where to write SELECTION.json (required unless --check)"
    )
    p.add_argument(
        "--from-scores",
        type=Path,
        default=None,
        help="select from a per-layer score file probed elsewhere (JSON; default: probe here)",
    )
    p.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="SELECTION",
        help="re-derive SELECTION.json's experts from the scores it records; exit 1 if they differ",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="pretrained model folder (default: the config's model)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/connito"),
        help="data and tokenizer cache (default .cache/connito)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the probing progress bar")
    p.add_argument(
        "--library",
        type=Path,
        default=None,
        help="expert library for a model.base: library:DOMAIN@vN config (path; default ~/.connito/library)",
    )


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what hardware a domain needs, from the model's config.json alone")
    p.add_argument("--config", required=True, type=Path, help="domain YAML")
    p.add_argument(
        "--selection",
        type=Path,
        default=None,
        help="SELECTION.json (default: the config's max experts per layer)",
    )
    p.add_argument(
        "--gpu-mem", type=float, default=None, help="GPU memory to check against, GiB (default: none)"
    )
    p.add_argument(
        "--eval-tflops",
        type=float,
        default=200.0,
        help="validator's sustained throughput for the evaluation estimate, TFLOP/s (default 200)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _add_pin(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pin", help="replace the model's and Hub datasets' branch names by the commit shas they name now"
    )
    p.add_argument("--config", required=True, type=Path, help="domain YAML (rewritten in place unless --out)")
    p.add_argument("--out", type=Path, default=None, help="write the pinned YAML here instead")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify-checkpoint", help="check an untrusted expert checkpoint as a validator would")
    p.add_argument("path", type=Path, help="checkpoint folder (experts.safetensors + manifest.json)")
    p.add_argument("--selection", required=True, type=Path, help="the domain's SELECTION.json")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder giving expected shapes and dtype (optional)"
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=512 * 2**20,
        help="size cap for the checkpoint in bytes (default 512 MiB)",
    )


def _add_localnet(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localnet", help="run the whole subnet on this machine, offline")
    p.add_argument("--config", type=Path, default=Path("configs/domains/tiny-math.yaml"), help="domain YAML")
    p.add_argument("--miners", type=int, default=3, help="honest miner processes (default 3)")
    p.add_argument("--validators", type=int, default=2, help="validator processes (default 2)")
    p.add_argument("--cycles", type=int, default=3, help="protocol cycles to run (default 3)")
    p.add_argument(
        "--workdir", type=Path, default=Path("runs/localnet"), help="run folder (default runs/localnet)"
    )
    p.add_argument(
        "--adversaries",
        default="",
        help="comma-separated extra miners: copy,nan,lazy,stale,heldout,sybil,replay,scaled (default none)",
    )
    p.add_argument(
        "--block-time", type=float, default=None, help="seconds per block (default: from the run plan)"
    )
    p.add_argument(
        "--metrics-base-port",
        type=int,
        default=9100,
        help="neuron i serves Prometheus metrics on 127.0.0.1:BASE+i (TCP port; default 9100; 0 = off)",
    )


# Verbs whose parser and fail-fast checks import no torch: a refused model is one line in seconds.
_LIGHT_COMMANDS = ("select", "plan", "pin")


def build_parser(*, light: bool = False) -> argparse.ArgumentParser:
    """The full parser, or with ``light`` only the verbs that import nothing heavy to parse."""
    parser = argparse.ArgumentParser(prog="connito", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_select(sub)
    _add_plan(sub)
    _add_pin(sub)
    if light:
        return parser
    from connito.library.commands import add_library_parsers
    from connito.node.status import add_status_parser
    from connito.owner.downstream_eval import add_owner_eval_parser

    _add_verify(sub)
    _add_localnet(sub)
    add_library_parsers(sub)
    add_owner_eval_parser(sub)
    add_status_parser(sub)
    return parser


def _dispatch_select(args: argparse.Namespace) -> int:
    if args.check is not None:
        from connito.owner.select_commands import run_check_selection

        return run_check_selection(args.check)
    if args.config is None or args.out is None:
        print("connito select: --config and --out are required (or --check SELECTION.json)", file=sys.stderr)
        return 2
    from connito.config import load_domain_config
    from connito.owner.model_check import check_family_early

    check_family_early(load_domain_config(args.config).model, config_path=args.config, model_dir=args.model)
    if args.from_scores is not None:
        from connito.owner.select_commands import run_select_from_scores

        return run_select_from_scores(args.config, args.from_scores, args.out)
    from connito.library.commands import DEFAULT_LIBRARY
    from connito.owner.bootstrap import run_select

    return run_select(
        args.config,
        args.out,
        model_dir=args.model,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        library=args.library or DEFAULT_LIBRARY,
    )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "select":
        return _dispatch_select(args)
    if args.command == "plan":
        from connito.config import load_domain_config
        from connito.owner.model_check import check_family_early

        check_family_early(load_domain_config(args.config).model, config_path=args.config)
        from connito.owner.plan import run_plan

        return run_plan(
            args.config,
            selection=args.selection,
            gpu_mem_gib=args.gpu_mem,
            as_json=args.json,
            eval_tflops=args.eval_tflops,
        )
    if args.command == "pin":
        from connito.owner.pin import run_pin

        return run_pin(args.config, out=args.out)
    if args.command == "verify-checkpoint":
        from connito.protocol.strict_loader import verify_checkpoint_cli

        return verify_checkpoint_cli(
            args.path, args.selection, model_dir=args.model, max_bytes=args.max_bytes
        )
    if args.command == "localnet":
        from connito.localnet import run_localnet

        return run_localnet(args)
    if args.command in ("library", "export"):
        from connito.library.commands import run_library_command

        return run_library_command(args)
    if args.command == "status":
        from connito.node.status import run_status

        return run_status(args)
    if args.command == "owner-eval":
        from connito.owner.downstream_eval import run_owner_eval

        return run_owner_eval(args)
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(light=verb in _LIGHT_COMMANDS).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except ConnitoError as exc:
        print(f"connito {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"connito {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
