"""Metrics: what a Prometheus scrape of a miner and a validator shows, the flags, W&B, the docs."""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
import types
import urllib.request
from pathlib import Path

import pytest
from bittensor.sp_core import Keypair
from e2e_harness import build_subnet, domain_config
from prometheus_client.parser import text_string_to_metric_families

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.errors import ConfigError, StoreError
from connito.hub import LocalStore, StoreRef
from connito.hub.metered import MeteredStore
from connito.localnet.runner import _neuron_flags, _plan
from connito.ml.training import TrainResult
from connito.node.context import PhaseLoop, guarded_tick
from connito.node.main import open_metrics
from connito.node.metrics import NodeMetrics, open_wandb
from connito.node.neuron_cli import parse_args
from connito.node.validator_state import CycleResult, ScoreRow
from connito.protocol.phases import phase, phase_bounds

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
HOTKEY = Keypair.create_from_uri("//metrics").ss58_address


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a real HTTP scrape of 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _meter(node, role: str) -> tuple[NodeMetrics, int]:
    """Give an in-process node its own metrics (as ``build_context`` does) and serve them."""
    metrics = NodeMetrics(role, hotkey=node.ctx.hotkey, domain=node.ctx.config.name)
    store = MeteredStore(node.ctx.store, on_bytes=metrics.add_store_bytes)
    node.ctx = dataclasses.replace(node.ctx, metrics=metrics, store=store)
    return metrics, metrics.serve(0, addr="127.0.0.1")


def test_scrape_shows_cycle_losses_reasons_and_bytes(tmp_path):
    """One cycle of a miner, a NaN adversary and a validator: each scrape shows what happened."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=1, validators=1, adversaries=("nan",))
    miner_metrics, miner_port = _meter(subnet.nodes["m0"], "miner")
    validator_metrics, validator_port = _meter(subnet.nodes["v0"], "validator")
    _, end = phase_bounds(0, "merge", config.cycle)
    try:
        while (block := subnet.chain.current_block()) <= end:  # the harness's loop, with metrics
            info = phase(block, config.cycle)
            for name, node in subnet.nodes.items():
                guarded_tick(name, node.tick, block, info, metrics=node.ctx.metrics)
            subnet.chain.advance_blocks(1)
        miner, validator = _scrape(miner_port), _scrape(validator_port)
    finally:
        miner_metrics.close()
        validator_metrics.close()
    result = subnet.nodes["v0"].state.results[0]
    miner_uid = next(r.uid for r in result.scores if r.hotkey == subnet.keys["m0"].ss58_address)

    assert (
        miner[
            (
                "connito_node_info",
                (("domain", "tiny-test"), ("hotkey", subnet.keys["m0"].ss58_address), ("role", "miner")),
            )
        ]
        == 1
    )
    for scraped in (miner, validator):
        assert scraped[("connito_cycle", ())] == 0
        assert scraped[("connito_phase", (("connito_phase", "merge"),))] == 1
        assert scraped[("connito_phase", (("connito_phase", "train"),))] == 0
        assert scraped[("connito_processed_block", ())] == end
        assert scraped[("connito_chain_block", ())] == end
        assert scraped[("connito_block_lag", ())] == 0
    assert miner[("connito_miner_inner_steps_total", ())] == config.training.inner_steps
    assert miner[("connito_miner_tokens_total", ())] > 0
    assert 0 < miner[("connito_miner_inner_loss", ())] < 20
    assert miner[("connito_miner_submissions_total", (("outcome", "ok"), ("stage", "commit")))] == 1
    assert miner[("connito_miner_submissions_total", (("outcome", "ok"), ("stage", "reveal")))] == 1
    checkpoint = Path(subnet.nodes["m0"].progress.checkpoint)
    assert miner[("connito_store_uploaded_bytes_total", ())] == sum(
        f.stat().st_size for f in checkpoint.iterdir()
    )
    assert miner[("connito_store_downloaded_bytes_total", ())] == 0

    assert validator[("connito_validator_accepted_total", ())] == 1
    assert validator[("connito_validator_rejected_total", (("reason", "non_finite"),))] == 1
    assert validator[("connito_store_downloaded_bytes_total", ())] > 2 * 1000  # two checkpoints
    assert validator[("connito_validator_global_loss", (("split", "domain"),))] == pytest.approx(
        result.global_domain_loss
    )
    assert validator[("connito_validator_global_loss", (("split", "general"),))] == pytest.approx(
        result.global_general_loss
    )
    row = next(r for r in result.scores if r.uid == miner_uid)
    assert validator[("connito_validator_submission_loss", (("uid", str(miner_uid)),))] == pytest.approx(
        row.domain_loss
    )
    assert validator[("connito_validator_weights_set_total", ())] == 1
    assert validator[("connito_validator_weights_set_block", ())] == result.weights_set_block
    assert validator[("connito_validator_weight", (("uid", str(miner_uid)),))] > 0
    assert validator[("connito_validator_merge_decisions_total", (("decision", result.decision),))] == 1
    assert result.decision in ("merged", "best_single")


def test_phase_loop_reports_block_lag_and_survived_errors(tmp_path):
    """A tick that takes 3 blocks shows as lag 3; a failing tick and a chain outage are counted."""
    config = domain_config()
    LocalChain.genesis(
        tmp_path / "chain.sqlite", netuid=0, seed=1, neurons=[GenesisNeuron(hotkey=HOTKEY, stake=1.0)]
    )
    chain = LocalChain.open(tmp_path / "chain.sqlite")
    metrics = NodeMetrics("miner")
    lag = lambda: metrics.registry.get_sample_value("connito_block_lag")  # noqa: E731
    seen: dict[int, float] = {}
    outage = {"left": 1}

    class FlakyChain:
        def current_block(self) -> int:
            if outage["left"] and chain.current_block() == 8:
                outage["left"] -= 1
                from connito.errors import ChainError

                raise ChainError("node down")
            return chain.current_block()

    def tick(block, info):
        seen[block] = lag()
        if block == 3:
            chain.advance_blocks(3)  # slow work: three blocks go by
        if block == 7:
            raise RuntimeError("boom")

    loop = PhaseLoop(
        FlakyChain(),
        config,
        poll_s=0.0,
        role="miner",
        metrics=metrics,
        sleep=lambda _s: chain.advance_blocks(1),
    )
    assert loop.run(tick, until_cycle=0) == 0
    # a new block is 1 behind; after the slow tick, 3; after the chain outage at block 8, 2
    assert (seen[1], seen[2], seen[6], seen[9]) == (1, 1, 3, 2), seen
    assert 4 not in seen and 8 not in seen
    value = metrics.registry.get_sample_value
    assert value("connito_errors_total", {"where": "tick", "kind": "RuntimeError"}) == 1
    assert value("connito_errors_total", {"where": "chain_read", "kind": "ChainError"}) == 1
    _, last = phase_bounds(0, "merge", config.cycle)
    assert value("connito_processed_block") == last
    assert value("connito_chain_block") == last + 1


def test_metered_store_counts_finished_transfers_only(tmp_path):
    counted: list[tuple[str, int]] = []
    store = MeteredStore(LocalStore(tmp_path / "hub"), on_bytes=lambda d, n: counted.append((d, n)))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "experts.safetensors").write_bytes(b"x" * 1000)
    (folder / "manifest.json").write_bytes(b"{}" * 10)
    ref = store.upload(folder, repo="miners/a")
    store.download(ref, tmp_path / "dest", max_bytes=10_000)
    with pytest.raises(StoreError):
        store.download(ref, tmp_path / "dest2", max_bytes=100)  # refused before a byte moves
    with pytest.raises(StoreError):
        store.download(
            StoreRef(kind="local", repo="miners/b", revision="0" * 64), tmp_path / "dest3", max_bytes=10_000
        )
    assert counted == [("upload", 1020), ("download", 1020)]
    assert store.list_files(ref) == {"experts.safetensors": 1000, "manifest.json": 20}


def test_validator_events_count_once_however_often_recorded():
    """``_record`` runs several times per cycle; counters move once per event."""
    metrics = NodeMetrics("validator")
    rows = [
        ScoreRow(hotkey="a", uid=3, accepted=True, domain_loss=2.5, utility=0.2),
        ScoreRow(hotkey="b", uid=4, accepted=False, reason="lazy"),
        ScoreRow(hotkey="c", uid=5, accepted=False, reason="lazy", domain_loss=float("nan")),
    ]
    result = CycleResult(
        cycle=2, scores=rows, global_domain_loss=2.7, global_general_loss=3.1, weights={3: 1.0}
    )
    for update in (
        {},
        {"weights_set_block": 40},
        {"weights_set_block": 40, "decision": "merged"},
        {"decision": "merged"},
    ):
        metrics.observe_cycle(result.model_copy(update=update))
    value = metrics.registry.get_sample_value
    assert value("connito_validator_accepted_total") == 1
    assert value("connito_validator_rejected_total", {"reason": "lazy"}) == 2
    assert value("connito_validator_weights_set_total") == 1
    assert value("connito_validator_merge_decisions_total", {"decision": "merged"}) == 1
    assert value("connito_validator_submission_loss", {"uid": "3"}) == 2.5
    assert (
        value("connito_validator_submission_loss", {"uid": "5"}) is None
    )  # NaN loss is not a number to plot
    metrics.observe_cycle(CycleResult(cycle=3, skipped=True, decision="none"))
    assert value("connito_validator_merge_decisions_total", {"decision": "skipped"}) == 1


# -- flags ---------------------------------------------------------------------------------------


def test_metrics_and_wandb_flags_parse():
    args = parse_args(
        "miner",
        ["--config", "d.yaml", "--metrics.port", "9101", "--wandb.project", "p", "--wandb.entity", "e"],
    )
    assert (args.metrics_port, args.metrics_addr, args.wandb_project, args.wandb_entity) == (
        9101,
        "0.0.0.0",
        "p",
        "e",
    )
    off = parse_args("validator", ["--config", "d.yaml", "--metrics.port", "0"])
    assert off.metrics_port is None and off.wandb_project is None
    assert parse_args("validator", ["--config", "d.yaml"]).metrics_port is None


@pytest.mark.parametrize(
    "argv",
    [["--metrics.port", "70000"], ["--metrics.port", "-1"], ["--metrics.port", "x"], ["--wandb.entity", "e"]],
)
def test_bad_metrics_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args("miner", ["--config", "d.yaml", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--metrics.port" in err or "--wandb.entity needs --wandb.project" in err


def test_localnet_gives_each_neuron_a_loopback_metrics_port(tmp_path):
    namespace = dict(
        adversaries="nan",
        miners=2,
        validators=1,
        cycles=1,
        config=tmp_path,
        workdir=tmp_path,
        block_time=None,
    )
    plan = _plan(types.SimpleNamespace(**namespace, metrics_base_port=9100))
    assert plan.metrics_base_port == 9100
    flags = _neuron_flags(
        tmp_path, tmp_path / "d.yaml", tmp_path, tmp_path / "s.json", "m0", plan, metrics_port=9102
    )
    args = parse_args("miner", flags)
    assert (args.metrics_port, args.metrics_addr) == (9102, "127.0.0.1")
    assert _plan(types.SimpleNamespace(**namespace, metrics_base_port=0)).metrics_base_port is None
    assert "--metrics.port" not in _neuron_flags(tmp_path, tmp_path, tmp_path, tmp_path, "m0", plan)
    with pytest.raises(ConfigError, match="--metrics-base-port"):
        _plan(types.SimpleNamespace(**namespace, metrics_base_port=65534))  # 4 neurons do not fit


def test_busy_port_is_a_one_line_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"--metrics.port: cannot serve metrics on 127.0.0.1:{port}"
        ) as info:
            NodeMetrics("miner").serve(port, addr="127.0.0.1")
    assert "\n" not in str(info.value)


# -- Weights & Biases ----------------------------------------------------------------------------


class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.inits = []
    module.run = _FakeRun()

    def init(**kwargs):
        module.inits.append(kwargs)
        return module.run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_sink_logs_training_and_cycle_numbers_at_the_block(fake_wandb):
    sink = open_wandb(project="p", entity="e", name="miner-5Fa", config={"role": "miner", "domain": "d"})
    assert fake_wandb.inits == [
        {
            "project": "p",
            "entity": "e",
            "name": "miner-5Fa",
            "config": {"role": "miner", "domain": "d"},
            "job_type": "miner",
        }
    ]
    metrics = NodeMetrics(sink=sink)  # every recorder, as a context built without a role has
    metrics.observe_tick(12, phase(12, domain_config().cycle))  # cycle 1 (10 blocks a cycle), commit phase
    metrics.observe_training(TrainResult(steps=2, losses=(3.0, 2.0), tokens=64, wall_s=0.1))
    metrics.observe_cycle(
        CycleResult(
            cycle=1,
            scores=[ScoreRow(hotkey="a", uid=1, accepted=True)],
            global_domain_loss=2.0,
            global_general_loss=3.0,
        )
    )
    assert fake_wandb.run.logged == [
        ({"cycle": 1, "phase": 1}, 12),
        ({"miner/inner_loss": 2.5, "miner/tokens": 64, "miner/steps": 2}, 12),
        (
            {
                "validator/accepted": 1,
                "validator/rejected": 0,
                "validator/global_domain_loss": 2.0,
                "validator/global_general_loss": 3.0,
            },
            12,
        ),
    ]
    metrics.close()
    assert fake_wandb.run.finished


def test_failing_wandb_sink_is_switched_off_not_raised(fake_wandb, caplog):
    def broken(data, step):
        raise OSError("wandb down")

    fake_wandb.run.log = broken
    metrics = NodeMetrics("miner", sink=open_wandb(project="p", entity=None, name="m", config={}))
    metrics.observe_training(TrainResult(steps=1, losses=(1.0,), tokens=8, wall_s=0.1))
    metrics.observe_training(TrainResult(steps=1, losses=(1.0,), tokens=8, wall_s=0.1))
    assert metrics.sink is None
    assert metrics.registry.get_sample_value("connito_miner_inner_steps_total") == 2
    assert [r.message for r in caplog.records if "sink failed" in r.message] == [
        "metrics sink failed, W&B logging off for this run"
    ]


def test_wandb_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an absent package looks like to import
    args = parse_args("miner", ["--config", "d.yaml", "--wandb.project", "p"])
    with pytest.raises(ConfigError) as info:
        open_metrics(args, domain_config(), HOTKEY)
    message = str(info.value)
    assert "\n" not in message and "pip install wandb" in message and message.startswith("--wandb.project")


# -- docs ----------------------------------------------------------------------------------------


def _exposed_names(metrics: NodeMetrics) -> set[str]:
    suffix = {"counter": "_total", "info": "_info"}
    return {family.name + suffix.get(family.type, "") for family in metrics.registry.collect()}


def test_every_metric_is_documented():
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), flags=re.MULTILINE))
    exposed = _exposed_names(NodeMetrics("miner")) | _exposed_names(NodeMetrics("validator"))
    assert exposed - documented == set(), "add these to docs/metrics.md"
    assert documented - exposed == set(), "docs/metrics.md lists metrics the code no longer has"
