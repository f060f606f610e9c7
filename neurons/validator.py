"""Validator entry point: bittensor-style flags, the domain YAML, then connito's validator loop.

``python neurons/validator.py --help`` lists every flag. Nothing runs at import. Exit codes: 0 success,
1 failure (one line on stderr, e.g. an unreachable chain naming its endpoint), 2 usage error.
"""

from __future__ import annotations

import sys

from connito.node.main import main as run_neuron

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return run_neuron("validator", argv)


if __name__ == "__main__":
    sys.exit(main())
