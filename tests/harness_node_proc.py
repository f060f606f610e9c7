"""One node of a world built by ``e2e_harness.build_subnet``, run in its own process through its
real neuron loop (``node_loop``: protocol version check, phase loop, guarded ticks).

    python tests/harness_node_proc.py WORLD NAME UNTIL_CYCLE KEEP_CYCLES

The world's chain has a manual clock; the parent process advances it. After every tick this
process writes the block it ticked to ``WORLD/ticked/NAME``, so the parent advances a block only
when every live node has finished the current one: a lockstep run of separate processes, as
deterministic as the in-process harness, in which a node can be killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from bittensor.sp_core import Keypair

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_harness import domain_config, node_context  # noqa: E402

from connito.data import build_domain_data  # noqa: E402
from connito.fsutil import atomic_write  # noqa: E402
from connito.hub import LocalStore  # noqa: E402
from connito.ml.selection_record import load_selection  # noqa: E402
from connito.node.context import node_loop  # noqa: E402
from connito.node.miner import Miner  # noqa: E402
from connito.node.validator import Validator  # noqa: E402


def main() -> int:
    world, name, until_cycle, keep_cycles = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config = domain_config()
    data = build_domain_data(config.data, cache_dir=world / "cache", model=config.model)
    ctx = node_context(
        world,
        name,
        Keypair.create_from_uri(f"//{name}"),
        config=config,
        selection=load_selection(world / "selection.json"),
        data=data,
        store=LocalStore(world / "hub"),
    )
    ctx = dataclasses.replace(ctx, keep_cycles=keep_cycles)
    node = Validator(ctx, progress_bars=False) if name.startswith("v") else Miner(ctx, progress_bars=False)
    ticked = world / "ticked" / name

    def tick(block: int, info) -> None:
        try:
            node.tick(block, info)
        finally:  # a failed tick is still a finished tick: the parent must not wait forever
            atomic_write(ticked, str(block).encode())

    loop = node_loop(ctx, role=name, poll_s=0.05)
    return loop.run(tick, until_cycle=until_cycle)


if __name__ == "__main__":
    sys.exit(main())
