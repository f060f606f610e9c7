"""Validator entry point: parse flags, load the domain, open the chain, hand over to connito.validator.

Nothing runs at import. Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from connito.chain.base import Chain
from connito.config import config_digest, load_domain_config
from connito.errors import ConnitoError
from connito.neuron_cli import NeuronArgs, configure_logging, open_chain, parse_args, resolve_args

__all__ = ["main"]

logger = logging.getLogger("connito.neurons.validator")


def main(argv: list[str] | None = None) -> int:
    args = parse_args("validator", argv)
    configure_logging(args)
    try:
        config = load_domain_config(args.config)
        args = resolve_args(args, config)
        chain = open_chain(args)
        logger.info(
            "validator start domain=%s netuid=%s config_digest=%s",
            config.name,
            args.netuid,
            config_digest(config)[:12],
        )
        run = _runner()
        if run is None:
            logger.info("connito.validator not available yet; chain block=%d", chain.current_block())
            return 0
        return run(args, chain)
    except ConnitoError as exc:  # library errors become one line here, nowhere else
        sys.stderr.write(f"validator: {' '.join(str(exc).split())}\n")
        return 1


def _runner() -> Callable[[NeuronArgs, Chain], int] | None:
    """connito.validator.run_validator, or None while that module does not exist yet."""
    try:
        from connito.validator import run_validator
    except ImportError as exc:
        if exc.name != "connito.validator":
            raise
        return None
    return run_validator


if __name__ == "__main__":
    sys.exit(main())
