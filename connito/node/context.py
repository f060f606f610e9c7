"""What miners and validators share: the domain, the selection, the base model, data and seams.

Built once in ``main`` from flags and the domain YAML, then passed down explicitly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from connito.chain.base import Chain, Neuron
from connito.config import DomainConfig
from connito.data import DomainData, build_domain_data
from connito.errors import ChainError, ConfigError, FatalNodeError
from connito.hub.base import CheckpointStore
from connito.ml.selection_record import ExpertSelection
from connito.node.metrics import NodeMetrics
from connito.node.neuron_flags import KEEP_CYCLES_DEFAULT
from connito.node.versioning import check_protocol_each_cycle
from connito.protocol.phases import PhaseInfo, phase

logger = logging.getLogger(__name__)

DEFAULT_KEEP_CYCLES = KEEP_CYCLES_DEFAULT  # a restart or a late adoption reaches back fewer cycles

__all__ = [
    "DEFAULT_KEEP_CYCLES",
    "NodeContext",
    "open_store",
    "load_node_data",
    "uid_of",
    "PhaseLoop",
    "guarded_tick",
    "node_loop",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeContext:
    """A neuron's fixed inputs."""

    config: DomainConfig
    selection: ExpertSelection
    chain: Chain
    store: CheckpointStore
    hotkey: str
    base_dir: Path  # a save_pretrained folder of the base model (weights + tokenizer)
    workdir: Path
    data: DomainData
    device: torch.device
    hub_repo: str  # where this node uploads
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # always recorded; served with --metrics.port
    keep_cycles: int | None = DEFAULT_KEEP_CYCLES  # cycles of files kept on disk (--keep.cycles; None: all)


def open_store(kind: str, path: Path | None, *, private: bool = False) -> CheckpointStore:
    """The checkpoint store a neuron's flags name: ``local:PATH`` or the Hugging Face Hub."""
    if kind == "local":
        from connito.hub import LocalStore

        if path is None:
            raise ConfigError("--hub local needs a path: --hub local:PATH", field="--hub")
        return LocalStore(path)
    from connito.hub import HfHubStore

    return HfHubStore.from_env(private=private)


def load_node_data(config: DomainConfig, cache_dir: Path, *, private: Sequence[Path] = ()) -> DomainData:
    """The domain's data; ``private`` files (a validator's) become its evaluation pool."""
    return build_domain_data(config.data, cache_dir=cache_dir, model=config.model, private_validation=private)


def uid_of(neurons: list[Neuron], hotkey: str) -> int | None:
    return next((n.uid for n in neurons if n.hotkey == hotkey), None)


def guarded_tick(
    role: str,
    tick: Callable[[int, PhaseInfo], None],
    block: int,
    info: PhaseInfo,
    *,
    metrics: NodeMetrics | None = None,
) -> bool:
    """Run one tick; any failure is logged with its traceback and the neuron lives on (False)."""
    try:
        tick(block, info)
    except FatalNodeError:  # retrying cannot heal it: the neuron stops with one line
        raise
    except Exception as exc:  # the top-level loop: log, keep the neuron alive, retry next block
        logger.error("%s tick failed cycle=%d phase=%s", role, info.cycle, info.phase, exc_info=True)
        if metrics is not None:
            metrics.tick_failed(exc)
            metrics.observe_tick(block, info)
        return False
    if metrics is not None:
        metrics.observe_tick(block, info)
    return True


class PhaseLoop:
    """Polls the chain and calls ``tick(info)`` once per block, logging each phase transition.

    Chain outages are survived: a failed read logs one WARNING line and backs off (bounded),
    never crashing the neuron. ``metrics`` sees every head read, tick and failure. ``on_cycle``
    runs at the first block seen of every cycle; a ``FatalNodeError`` from it or a tick ends the loop.
    """

    def __init__(
        self,
        chain: Chain,
        config: DomainConfig,
        *,
        poll_s: float,
        role: str,
        sleep: Callable[[float], None] = time.sleep,
        metrics: NodeMetrics | None = None,
        on_cycle: Callable[[int], None] | None = None,
    ) -> None:
        self.chain = chain
        self.metrics = metrics
        self.on_cycle = on_cycle
        self.config = config
        self.poll_s = poll_s
        self.role = role
        self._sleep = sleep
        self._last: tuple[int, str] | None = None
        self._last_block: int | None = None

    def run(self, tick: Callable[[int, PhaseInfo], None], *, until_cycle: int | None = None) -> int:
        """Loop until ``until_cycle`` has completed (None: forever). Returns an exit code."""
        backoff_s = self.poll_s
        while True:
            try:
                block = self.chain.current_block()
            except ChainError as exc:
                logger.warning("%s chain read failed: %s (retry in %.1fs)", self.role, exc, backoff_s)
                if self.metrics is not None:
                    self.metrics.chain_read_failed(exc)
                self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 60.0)
                continue
            backoff_s = self.poll_s
            if self.metrics is not None:
                self.metrics.observe_head(block)
            info = phase(block, self.config.cycle)
            if until_cycle is not None and info.cycle > until_cycle:
                logger.info("%s done cycles=%d block=%d", self.role, until_cycle + 1, block)
                return 0
            if self.on_cycle is not None and (self._last is None or info.cycle != self._last[0]):
                self.on_cycle(info.cycle)  # e.g. the protocol version check; may stop the node
            if (info.cycle, info.phase) != self._last:
                logger.info(
                    "%s cycle=%d phase=%s block=%d blocks_left=%d",
                    self.role,
                    info.cycle,
                    info.phase,
                    block,
                    info.blocks_left,
                )
                self._last = (info.cycle, info.phase)
            if block != self._last_block:
                self._last_block = block
                if not guarded_tick(self.role, tick, block, info, metrics=self.metrics):
                    self._sleep(self.poll_s)
                continue
            self._sleep(self.poll_s)


def node_loop(ctx: NodeContext, *, role: str, poll_s: float) -> PhaseLoop:
    """A neuron's phase loop: ``ctx``'s chain and metrics, the protocol version checked every cycle."""
    return PhaseLoop(
        ctx.chain,
        ctx.config,
        poll_s=poll_s,
        role=role,
        metrics=ctx.metrics,
        on_cycle=lambda cycle: check_protocol_each_cycle(ctx.chain, role, cycle),
    )
