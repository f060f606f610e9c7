"""Entry point of a localnet adversary: the miner's flags plus ``--kind`` and the victim to copy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from connito.config import load_domain_config
from connito.errors import ChainError, ConfigError, StoreError
from connito.localnet.adversary import ADVERSARY_KINDS, AdversaryMiner
from connito.node.main import build_context
from connito.node.neuron_cli import configure_logging, open_chain, parse_args, resolve_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--kind", choices=ADVERSARY_KINDS, required=True)
    extra.add_argument("--victim-workdir", type=Path, default=None)
    extra.add_argument("--victim-hotkey", default=None)
    extra.add_argument(
        "--noise", type=float, default=0.2, help="sybil: noise norm / the victim's update norm"
    )
    known, rest = extra.parse_known_args(argv)
    args = parse_args("miner", rest)
    configure_logging(args)
    try:
        config = load_domain_config(args.config)
        args = resolve_args(args, config)
        ctx = build_context(args, config, open_chain(args))
    except (ConfigError, ChainError, StoreError) as exc:
        sys.stderr.write(f"adversary: {' '.join(str(exc).split())}\n")
        return 1
    node = AdversaryMiner(
        ctx,
        poll_s=args.poll_s,
        progress_bars=False,
        kind=known.kind,
        victim_workdir=known.victim_workdir,
        victim_hotkey=known.victim_hotkey,
        noise=known.noise,
    )
    return node.run(until_cycle=args.until_cycle)


if __name__ == "__main__":
    sys.exit(main())
