"""A neuron's numbers for dashboards: a Prometheus registry of its own, optionally mirrored to W&B.

Each ``NodeMetrics`` owns a ``CollectorRegistry`` (never prometheus_client's global one), so
several neurons in one process (the tests, the e2e harness) keep separate numbers. The neuron
calls one recording method where an event happens: a tick, a training chunk, a recorded cycle,
a finished store transfer. Recording never raises into the neuron: Prometheus updates are
in-memory, and a failing W&B sink is switched off with one WARNING line. Every metric is listed
in ``docs/metrics.md`` (a test keeps the two in sync).

Label cardinality is bounded: ``uid`` by the subnet size (at most 256 on Bittensor), ``reason``
and ``decision`` by the protocol's fixed codes, ``kind`` by exception class names, ``logger``
by connito's module names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from connito.errors import ConfigError
from connito.protocol.phases import PENDING, PHASES, PhaseInfo

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from connito.ml.training import TrainResult
    from connito.node.validator_state import CycleResult

logger = logging.getLogger(__name__)

__all__ = ["NodeMetrics", "MetricsSink", "WandbSink", "open_wandb"]

DEFAULT_METRICS_ADDR = "0.0.0.0"  # like node_exporter: reachable by a Prometheus server elsewhere
WANDB_INSTALL_HINT = "pip install wandb"
PHASE_INDEX = {name: index for index, name in enumerate(PHASES)}  # W&B plots numbers, not states


class MetricsSink(Protocol):
    """Where numbers go besides Prometheus (Weights & Biases): a flat dict per chain block."""

    def log(self, data: Mapping[str, float], *, step: int) -> None: ...

    def close(self) -> None: ...


class NodeMetrics:
    """One neuron's metrics; ``serve`` exposes them over HTTP for Prometheus to scrape."""

    def __init__(
        self, role: str = "", *, hotkey: str = "", domain: str = "", sink: MetricsSink | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.role = role
        self.sink = sink
        self._server: WSGIServer | None = None
        self._log_handler: _LogCounter | None = None
        self._head: int | None = None
        self._processed: int | None = None
        self._phase: str = PENDING
        self._seen: set[tuple[int, str]] = set()  # (cycle, event) already counted: _record runs often
        self._define_node()
        if role in ("miner", ""):  # "": a context built without a role (tests) records everything
            self._define_miner()
        if role in ("validator", ""):
            self._define_validator()
        if role:
            self.node_info.info({"role": role, "hotkey": hotkey, "domain": domain})

    # -- definitions -------------------------------------------------------------------------

    def _define_node(self) -> None:
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.node_info = Info("connito_node", "who this neuron is", registry=reg)
        self.phase = Enum(
            "connito_phase",
            "protocol phase of the block last ticked",
            states=[PENDING, *PHASES],
            registry=reg,
        )
        self.cycle = Gauge(
            "connito_cycle", "cycle of the block last ticked (-1 before genesis)", registry=reg
        )
        self.chain_block = Gauge("connito_chain_block", "chain head at the last poll", registry=reg)
        self.processed_block = Gauge("connito_processed_block", "last block this neuron ticked", registry=reg)
        self.block_lag = Gauge(
            "connito_block_lag", "chain head minus the last block ticked (blocks behind)", registry=reg
        )
        self.errors = Counter(
            "connito_errors",
            "failures the loop survived, by where and exception class",
            ["where", "kind"],
            registry=reg,
        )
        self.log_records = Counter(
            "connito_log_records",
            "WARNING and ERROR log lines, by level and logger",
            ["level", "logger"],
            registry=reg,
        )
        self.uploaded_bytes = Counter(
            "connito_store_uploaded_bytes", "bytes of finished uploads", registry=reg
        )
        self.downloaded_bytes = Counter(
            "connito_store_downloaded_bytes", "bytes of finished downloads", registry=reg
        )

    def _define_miner(self) -> None:
        reg = self.registry
        self.inner_loss = Gauge(
            "connito_miner_inner_loss", "mean training loss of the last inner-step chunk", registry=reg
        )
        self.inner_tokens = Counter("connito_miner_tokens", "predicted tokens trained on", registry=reg)
        self.inner_steps = Counter("connito_miner_inner_steps", "inner optimizer steps taken", registry=reg)
        self.miner_submissions = Counter(
            "connito_miner_submissions",
            "commit and reveal attempts by outcome",
            ["stage", "outcome"],
            registry=reg,
        )

    def _define_validator(self) -> None:
        reg = self.registry
        self.accepted = Counter("connito_validator_accepted", "submissions accepted", registry=reg)
        self.rejected = Counter(
            "connito_validator_rejected", "submissions rejected, by reason", ["reason"], registry=reg
        )
        self.submission_loss = Gauge(
            "connito_validator_submission_loss",
            "held-out domain loss of each submission, last cycle",
            ["uid"],
            registry=reg,
        )
        self.submission_utility = Gauge(
            "connito_validator_submission_utility",
            "Proof-of-Loss utility of each submission, last cycle",
            ["uid"],
            registry=reg,
        )
        self.global_loss = Gauge(
            "connito_validator_global_loss",
            "held-out loss of the global model, last cycle",
            ["split"],
            registry=reg,
        )
        self.weight = Gauge(
            "connito_validator_weight", "weight set on chain per uid, last set", ["uid"], registry=reg
        )
        self.weights_set = Counter(
            "connito_validator_weights_set", "successful set_weights transactions", registry=reg
        )
        self.weights_set_block = Gauge(
            "connito_validator_weights_set_block", "block of the last set_weights", registry=reg
        )
        self.merge_decisions = Counter(
            "connito_validator_merge_decisions", "cycle outcomes: merged, best_single, none, adopted, skipped", ["decision"],
            registry=reg,
        )  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self, port: int, *, addr: str = DEFAULT_METRICS_ADDR) -> int:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the bound port (0: any free).

        Raises:
            ConfigError: the port cannot be bound (in use, or not allowed).
        """
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}", field="--metrics.port"
            ) from None
        bound = int(self._server.server_address[1])
        logger.info("metrics serving url=http://%s:%d/metrics", addr, bound)
        return bound

    def count_log_records(self, name: str = "connito") -> None:
        """Count WARNING and ERROR lines of logger ``name`` (process-wide: one neuron per process)."""
        if self._log_handler is None:
            self._log_handler = _LogCounter(self.log_records)
            logging.getLogger(name).addHandler(self._log_handler)

    def close(self) -> None:
        """Stop the HTTP server, the log counter and the sink."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._log_handler is not None:
            logging.getLogger("connito").removeHandler(self._log_handler)
            self._log_handler = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    # -- every neuron ------------------------------------------------------------------------

    def observe_head(self, block: int) -> None:
        """The chain head the loop just read."""
        self._head = block if self._head is None else max(self._head, block)
        self.chain_block.set(self._head)
        self._update_lag()

    def observe_tick(self, block: int, info: PhaseInfo) -> None:
        """A tick of ``block`` finished (well or not)."""
        if info.phase != self._phase:
            self._phase = info.phase
            self.phase.state(info.phase)
            self._emit({"cycle": info.cycle, "phase": PHASE_INDEX.get(info.phase, -1)}, step=block)
        self.cycle.set(info.cycle)
        self._processed = block
        self.processed_block.set(block)
        self.observe_head(block)

    def tick_failed(self, exc: BaseException) -> None:
        self.errors.labels(where="tick", kind=type(exc).__name__).inc()

    def chain_read_failed(self, exc: BaseException) -> None:
        self.errors.labels(where="chain_read", kind=type(exc).__name__).inc()

    def add_store_bytes(self, direction: str, n_bytes: int) -> None:
        """Bytes of one finished transfer (``MeteredStore`` calls this, from any thread)."""
        (self.uploaded_bytes if direction == "upload" else self.downloaded_bytes).inc(n_bytes)

    # -- miner -------------------------------------------------------------------------------

    def observe_training(self, result: TrainResult) -> None:
        """One ``SparseTrainer.train`` chunk."""
        self.inner_steps.inc(result.steps)
        self.inner_tokens.inc(result.tokens)
        if result.losses:
            self.inner_loss.set(result.mean_loss)
            self._emit(
                {
                    "miner/inner_loss": result.mean_loss,
                    "miner/tokens": result.tokens,
                    "miner/steps": result.steps,
                }
            )

    def miner_stage(self, stage: str, *, ok: bool) -> None:
        """A commit or reveal attempt."""
        self.miner_submissions.labels(stage=stage, outcome="ok" if ok else "failed").inc()

    # -- validator ---------------------------------------------------------------------------

    def observe_cycle(self, result: CycleResult) -> None:
        """A recorded ``CycleResult``; each of its events counts once however often it is recorded."""
        if result.scores and self._first(result.cycle, "scores"):
            self._observe_scores(result)
        if result.weights_set_block is not None and self._first(result.cycle, "weights"):
            self.weights_set.inc()
            self.weights_set_block.set(result.weights_set_block)
            self.weight.clear()
            for uid, weight in result.weights.items():
                self.weight.labels(uid=str(uid)).set(weight)
        decision = "skipped" if result.skipped else result.decision
        if decision != "pending" and self._first(result.cycle, f"decision:{decision}"):
            self.merge_decisions.labels(decision=decision).inc()
            loss = result.result_domain_loss
            self._emit(
                {"validator/decision_" + decision: 1.0, **({"validator/result_loss": loss} if loss else {})}
            )

    def _observe_scores(self, result: CycleResult) -> None:
        self.submission_loss.clear()
        self.submission_utility.clear()
        for row in result.scores:
            if row.accepted:
                self.accepted.inc()
            else:
                self.rejected.labels(reason=row.reason or "unknown").inc()
            if row.domain_loss is not None and math.isfinite(row.domain_loss):
                self.submission_loss.labels(uid=str(row.uid)).set(row.domain_loss)
            self.submission_utility.labels(uid=str(row.uid)).set(row.utility)
        losses = {"domain": result.global_domain_loss, "general": result.global_general_loss}
        for split, loss in losses.items():
            if loss is not None:
                self.global_loss.labels(split=split).set(loss)
        accepted = sum(row.accepted for row in result.scores)
        self._emit(
            {
                "validator/accepted": accepted,
                "validator/rejected": len(result.scores) - accepted,
                **{
                    f"validator/global_{split}_loss": loss
                    for split, loss in losses.items()
                    if loss is not None
                },
            }
        )

    # -- helpers -----------------------------------------------------------------------------

    def _first(self, cycle: int, event: str) -> bool:
        if (cycle, event) in self._seen:
            return False
        self._seen.add((cycle, event))
        return True

    def _update_lag(self) -> None:
        if self._head is not None and self._processed is not None:
            self.block_lag.set(self._head - self._processed)

    def _emit(self, data: Mapping[str, float], *, step: int | None = None) -> None:
        """Mirror ``data`` to the sink at the current block; a failing sink is switched off."""
        if self.sink is None:
            return
        step = step if step is not None else (self._processed or 0)
        try:
            self.sink.log(data, step=step)
        except Exception:  # telemetry must never stop a neuron: log once, stop mirroring
            logger.warning("metrics sink failed, W&B logging off for this run", exc_info=True)
            self.sink = None


class _LogCounter(logging.Handler):
    def __init__(self, counter: Counter) -> None:
        super().__init__(level=logging.WARNING)
        self._counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self._counter.labels(level=record.levelname, logger=record.name).inc()


# -- Weights & Biases --------------------------------------------------------------------------


class WandbSink:
    """Mirrors metrics to a W&B run; the chain block is the step (monotonic per neuron)."""

    def __init__(self, run) -> None:  # noqa: ANN001 - a wandb Run, imported lazily
        self.run = run

    def log(self, data: Mapping[str, float], *, step: int) -> None:
        self.run.log(dict(data), step=step)

    def close(self) -> None:
        self.run.finish()


def open_wandb(*, project: str, entity: str | None, name: str, config: Mapping[str, object]) -> WandbSink:
    """Start a W&B run for this neuron; wandb is imported only here, only when asked for.

    Raises:
        ConfigError: wandb is not installed.
    """
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"--wandb.project needs the wandb package, which is not installed: {WANDB_INSTALL_HINT}",
            field="--wandb.project",
        ) from None
    run = wandb.init(
        project=project, entity=entity, name=name, config=dict(config), job_type=str(config.get("role", ""))
    )
    return WandbSink(run)
