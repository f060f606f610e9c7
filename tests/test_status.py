"""``connito status``: a miner learns, from public data only, what validators decided and why.

The oracle is the validators themselves: for each adversary of a run, the status replay must
name the same rejection reason the lead recorded, and for an honest miner the same acceptance,
loss, rank and merge weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_harness import build_subnet, domain_config

from connito.chain.local import LocalChain
from connito.cli import main
from connito.hub import LocalStore
from connito.node.status import explain_submission, format_status
from connito.protocol.phases import phase_bounds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Cycle 0 of a subnet with every adversary, through its merge phase."""
    root = tmp_path_factory.mktemp("status-run")
    config = domain_config()
    subnet = build_subnet(root, config, miners=2, validators=1, adversaries=("copy", "nan", "lazy", "stale"))
    subnet.run_until(phase_bounds(0, "merge", config.cycle)[1])
    return root, config, subnet


def _ctx(root: Path, subnet, tmp_path: Path):
    import dataclasses

    ctx = subnet.nodes["m0"].ctx
    return dataclasses.replace(
        ctx, chain=LocalChain.open(root / "chain.sqlite"), store=LocalStore(root / "hub"), workdir=tmp_path
    )


def test_status_names_each_adversarys_rejection_as_the_validators_did(run, tmp_path: Path) -> None:
    root, _, subnet = run
    lead = subnet.nodes["v0"]
    recorded = {row.hotkey: row for row in lead.state.results[0].scores}
    for name in ("adv-copy", "adv-nan", "adv-lazy", "adv-stale", "m0"):
        hotkey = subnet.keys[name].ss58_address
        status = explain_submission(_ctx(root, subnet, tmp_path / name), hotkey, 0)
        row = recorded[hotkey]
        assert (status.accepted, status.reason) == (row.accepted, row.reason), (name, format_status(status))
        assert status.committed and status.revealed
        if row.accepted:
            assert status.domain_loss == row.domain_loss and status.rank is not None
            merged = set(lead.state.results[0].merged)
            assert status.merged == (hotkey in merged)
        else:
            assert status.cycle_weight == 0.0 and status.rank is None
            assert all(weight == 0.0 for weight in status.chain_weights.values())


def test_status_command_prints_one_json_verdict(run, tmp_path: Path, capsys) -> None:
    root, _, subnet = run
    config_path = tmp_path / "domain.yaml"
    import yaml
    from e2e_harness import TINY_DOMAIN

    config_path.write_text(yaml.safe_dump(TINY_DOMAIN))
    hotkey = subnet.keys["adv-nan"].ss58_address
    code = main(
        [
            "status", "--config", str(config_path), "--selection", str(root / "selection.json"),
            "--hotkey", hotkey, "--cycle", "0", "--chain", f"local:{root / 'chain.sqlite'}",
            "--hub", f"local:{root / 'hub'}", "--model-path", str(root / "base"),
            "--workdir", str(tmp_path / "scratch"), "--data-cache", str(root / "cache"), "--json",
        ]
    )  # fmt: skip
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and status["reason"] == "non_finite" and status["hotkey"] == hotkey


def test_status_sees_the_history_a_validator_held(tmp_path: Path) -> None:
    """Cycle 1: a replay of cycle 0's accepted update is named as the validators named it, and an
    honest miner's loss equals the lead's to the bit (its step length comes from cycle 0)."""
    root = tmp_path / "run"
    config = domain_config()
    subnet = build_subnet(root, config, miners=2, validators=1, adversaries=("replay",))
    subnet.run_until(phase_bounds(1, "merge", config.cycle)[1])
    recorded = {row.hotkey: row for row in subnet.nodes["v0"].state.results[1].scores}
    replayer, honest = subnet.keys["adv-replay"].ss58_address, subnet.keys["m0"].ss58_address
    assert recorded[replayer].reason == "replay"

    status = explain_submission(_ctx(root, subnet, tmp_path / "replay"), replayer, 1)
    assert (status.accepted, status.reason) == (False, "replay"), format_status(status)
    assert "cycle 0" in status.detail
    status = explain_submission(_ctx(root, subnet, tmp_path / "honest"), honest, 1)
    assert status.accepted and status.domain_loss == recorded[honest].domain_loss
    # without the look-back the replay goes unseen: the history is what makes the verdict right
    blind = explain_submission(_ctx(root, subnet, tmp_path / "blind"), replayer, 1, history_cycles=0)
    assert blind.reason != "replay"


def test_status_explains_several_hotkeys_from_one_replay(run, tmp_path: Path, capsys) -> None:
    """An operator with several miners asks once: one verdict per hotkey, exit 1 if any was rejected."""
    root, _, subnet = run
    config_path = tmp_path / "domain.yaml"
    import yaml
    from e2e_harness import TINY_DOMAIN

    config_path.write_text(yaml.safe_dump(TINY_DOMAIN))
    names = ("m0", "adv-lazy", "adv-copy")
    hotkeys = [subnet.keys[name].ss58_address for name in names]
    code = main(
        [
            "status", "--config", str(config_path), "--selection", str(root / "selection.json"),
            *[arg for hotkey in hotkeys for arg in ("--hotkey", hotkey)],
            "--cycle", "0", "--chain", f"local:{root / 'chain.sqlite'}",
            "--hub", f"local:{root / 'hub'}", "--model-path", str(root / "base"),
            "--workdir", str(tmp_path / "scratch"), "--data-cache", str(root / "cache"), "--json",
        ]
    )  # fmt: skip
    lines = [
        json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")
    ]
    assert code == 1
    assert [(s["hotkey"], s["accepted"], s["reason"]) for s in lines] == [
        (hotkeys[0], True, None),
        (hotkeys[1], False, "lazy"),
        (hotkeys[2], False, "duplicate"),
    ]
