"""A validator process for the kill -9 tests: runs the lead validator ``v0`` of a world built by
``e2e_harness.build_subnet`` through cycle 0's evaluate and merge phases, as its neuron loop would.

    python tests/kill9_child.py WORLD [--kill HOOK:N:WHEN] [--count FILE]

``--kill`` sends SIGKILL to this process at the N-th call of HOOK, before or after the real call
(no Python cleanup runs: no ``finally``, no ``atexit``, buffered writes lost). ``--count`` writes
how many times each hook fired, so the test can enumerate every kill point of a clean run.
The manual clock advances only after a block's tick has finished, so a restarted process re-ticks
the block it died in, as a restarted neuron on a live chain would.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import torch
from bittensor.sp_core import Keypair

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_harness import domain_config, node_context  # noqa: E402

import connito.chain.local  # noqa: E402
import connito.hub.local  # noqa: E402
import connito.node.validator  # noqa: E402
import connito.node.validator_merge  # noqa: E402
import connito.protocol.merge  # noqa: E402
import connito.protocol.scoring  # noqa: E402
from connito.data import build_domain_data  # noqa: E402
from connito.hub import LocalStore  # noqa: E402
from connito.ml.selection_record import load_selection  # noqa: E402
from connito.node.context import guarded_tick  # noqa: E402
from connito.protocol.phases import phase, phase_bounds  # noqa: E402

# name -> (owner object, attribute): every durable step of evaluate, weights, merge and publish
HOOKS = {
    "os.replace": (os, "replace"),  # every atomic write and every store move, one by one
    "batch_losses": (connito.protocol.scoring, "batch_losses"),  # mid-evaluation, per scored model
    "apply_merge": (connito.node.validator_merge, "apply_merge"),
    "store.upload": (connito.hub.local.LocalStore, "upload"),
    "chain.commit": (connito.chain.local.LocalChain, "commit"),
    "chain.set_weights": (connito.chain.local.LocalChain, "set_weights"),
    "save_global": (connito.node.validator_merge, "save_global"),
}


def _install(counts: Counter, kill: tuple[str, int, str] | None) -> None:
    for name, (owner, attribute) in HOOKS.items():
        real = getattr(owner, attribute)

        def hooked(*args, __real=real, __name=name, **kwargs):
            counts[__name] += 1
            due = kill is not None and kill[0] == __name and kill[1] == counts[__name]
            if due and kill[2] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = __real(*args, **kwargs)
            if due and kill[2] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, attribute, functools.wraps(real)(hooked))


def _validator(world: Path) -> connito.node.validator.Validator:
    config = domain_config()
    ctx = node_context(
        world,
        "v0",
        Keypair.create_from_uri("//v0"),
        config=config,
        selection=load_selection(world / "selection.json"),
        data=build_domain_data(config.data, cache_dir=world / "cache", model=config.model),
        store=LocalStore(world / "hub"),
    )
    return connito.node.validator.Validator(ctx)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("world", type=Path)
    parser.add_argument("--kill", default=None, help="HOOK:N:before|after")
    parser.add_argument("--count", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kill = None
    if args.kill:
        name, n, when = args.kill.split(":")
        kill = (name, int(n), when)
    counts: Counter = Counter()
    validator = _validator(args.world)  # built before the hooks: only the phases are killed
    _install(counts, kill)
    chain = validator.ctx.chain
    _, last = phase_bounds(0, "merge", validator.ctx.config.cycle)
    while (block := chain.current_block()) <= last:
        guarded_tick("v0", validator.tick, block, phase(block, validator.ctx.config.cycle))
        chain.advance_blocks(1)
    if args.count:
        args.count.write_text(json.dumps(dict(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
