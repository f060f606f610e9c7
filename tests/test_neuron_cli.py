"""The neurons' command line: bittensor's dotted flags, exit codes, and one-line failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bittensor as bt
import pytest

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import load_domain_config
from connito.errors import ConfigError
from connito.node.neuron_cli import open_chain, parse_args, resolve_args
from connito.node.neuron_flags import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOMAIN = REPO_ROOT / "configs" / "domains" / "tiny-math.yaml"
SUBPROCESS_TIMEOUT_S = 180  # a hang guard, not a timing assert: imports are slow on a loaded machine


@pytest.fixture(autouse=True)
def _home_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default paths (~/.bittensor/wallets, ~/.connito) resolve inside the test's own folder."""
    monkeypatch.setenv("HOME", str(tmp_path))


def _wallet(path: Path, name: str = "w", hotkey: str = "h") -> bt.Wallet:
    wallet = bt.Wallet(name, hotkey, path=str(path))
    wallet.create_new_coldkey(use_password=False, on_mnemonic=lambda _: None)
    wallet.create_new_hotkey(use_password=False, on_mnemonic=lambda _: None)
    return wallet


def _run(script: str, *argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k != "BT_CHAIN_ENDPOINT"
    }  # "local" must mean 127.0.0.1:9944
    env["HOME"] = str(tmp_path)  # anything the SDK caches lands in the test's folder
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "neurons" / script), *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.mark.parametrize("script", ["miner.py", "validator.py"])
def test_help_exits_zero_and_lists_bittensor_and_connito_flags(script: str, tmp_path: Path) -> None:
    result = _run(script, "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--subtensor.network", "--wallet.name", "--netuid", "--config", "--chain"):
        assert flag in result.stdout


def test_validator_without_chain_fails_with_one_stderr_line_naming_endpoint(tmp_path: Path) -> None:
    """No node on ws://127.0.0.1:9944: exit non-zero within the timeout, one line, no traceback."""
    _wallet(tmp_path / "wallets")
    result = _run(
        "validator.py",
        "--config",
        str(DOMAIN),
        "--subtensor.network",
        "local",
        "--wallet.name",
        "w",
        "--wallet.hotkey",
        "h",
        "--wallet.path",
        str(tmp_path / "wallets"),
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "ws://127.0.0.1:9944" in lines[0] and "cannot reach chain" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_invalid_domain_config_fails_with_one_line_naming_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Not Valid\n")
    result = _run("miner.py", "--config", str(bad), tmp_path=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert str(bad) in line and "Traceback" not in result.stderr


def test_missing_config_flag_is_usage_error_exit_2(tmp_path: Path) -> None:
    result = _run("miner.py", "--subtensor.network", "local", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_dotted_flags_parse_into_neuron_args(tmp_path: Path) -> None:
    args = parse_args(
        "miner",
        [
            "--config",
            "d.yaml",
            "--netuid",
            "12",
            "--subtensor.network",
            "test",
            "--subtensor.chain_endpoint",
            "ws://10.0.0.1:9944",
            "--wallet.name",
            "cold",
            "--wallet.hotkey",
            "hot",
            "--wallet.path",
            str(tmp_path),
            "--hub",
            f"local:{tmp_path / 'store'}",
            "--hub.repo",
            "me/experts",
            "--hub.private",
            "--workdir",
            str(tmp_path / "state"),
            "--logging.debug",
        ],
    )
    assert (args.role, args.config, args.netuid) == ("miner", Path("d.yaml"), 12)
    assert args.subtensor_network == "ws://10.0.0.1:9944"  # the explicit endpoint wins
    assert (args.wallet_name, args.wallet_hotkey, args.wallet_path) == ("cold", "hot", tmp_path)
    assert (args.hub, args.hub_path, args.hub_repo, args.hub_private) == (
        "local",
        tmp_path / "store",
        "me/experts",
        True,
    )
    assert args.workdir == tmp_path / "state" and args.local_chain is None
    assert args.logging_debug and not args.logging_trace


def test_defaults_follow_bittensor_conventions() -> None:
    args = parse_args("validator", ["--config", "d.yaml"])
    assert (args.network, args.chain_endpoint, args.netuid) == ("finney", None, None)
    assert (args.wallet_name, args.wallet_hotkey) == ("default", "default")
    assert args.wallet_path == Path("~/.bittensor/wallets").expanduser()
    assert (args.hub, args.hub_path, args.local_chain) == ("hf", None, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--chain", "subtensor"],
        ["--chain", "local:"],
        ["--hub", "s3://bucket"],
        ["--subtensor.network", "mainnet"],
        ["--subtensor.chain_endpoint", "http://127.0.0.1:9944"],
        ["--netuid", "-1"],
    ],
)
def test_malformed_flag_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args("miner", ["--config", "d.yaml", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_every_flag_has_help_text_with_default_or_requirement() -> None:
    for role in ("miner", "validator"):
        for action in build_parser(role)._actions:
            if action.dest == "help":
                continue
            assert action.help and ("default" in action.help or "required" in action.help), action.dest


def test_netuid_flag_wins_over_yaml_and_yaml_fills_the_gap(tmp_path: Path) -> None:
    config = load_domain_config(DOMAIN)
    from_yaml = resolve_args(parse_args("miner", ["--config", str(DOMAIN), "--wallet.name", "c"]), config)
    assert from_yaml.netuid == config.netuid
    assert (
        from_yaml.workdir
        == Path("~/.connito").expanduser() / "c" / "default" / f"netuid{config.netuid}" / "miner"
    )
    from_flag = resolve_args(parse_args("miner", ["--config", str(DOMAIN), "--netuid", "9"]), config)
    assert from_flag.netuid == 9


def test_open_chain_with_missing_hotkey_is_config_error(tmp_path: Path) -> None:
    args = parse_args("miner", ["--config", "d.yaml", "--netuid", "1", "--wallet.path", str(tmp_path)])
    with pytest.raises(ConfigError, match="wallet.hotkey: hotkey 'default' of wallet 'default' not found"):
        open_chain(args)


def test_open_chain_local_ledger_signs_as_the_wallet_hotkey(tmp_path: Path) -> None:
    wallet = _wallet(tmp_path / "wallets")
    ledger = tmp_path / "ledger.db"
    hotkey = wallet.hotkeypub.ss58_address
    LocalChain.genesis(
        ledger, netuid=3, seed=1, neurons=[GenesisNeuron(hotkey=hotkey, stake=1.0, validator_permit=True)]
    )
    argv = ["--config", "d.yaml", "--chain", f"local:{ledger}", "--wallet.name", "w", "--wallet.hotkey", "h"]
    chain = open_chain(parse_args("validator", [*argv, "--wallet.path", str(tmp_path / "wallets")]))
    assert chain.hotkey == hotkey
    assert chain.current_block() == 0


def test_neuron_without_selection_fails_with_one_line(tmp_path: Path) -> None:
    """A reachable chain but no --selection: exit 1, one stderr line naming the flag, no traceback."""
    wallet = _wallet(tmp_path / "wallets")
    ledger = tmp_path / "ledger.db"
    neuron = GenesisNeuron(hotkey=wallet.hotkeypub.ss58_address, stake=1.0, validator_permit=True)
    LocalChain.genesis(ledger, netuid=0, seed=1, neurons=[neuron])
    result = _run(
        "validator.py",
        *("--config", str(DOMAIN), "--chain", f"local:{ledger}"),
        *("--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "wallets")),
        *("--workdir", str(tmp_path / "work")),
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--selection" in result.stderr and "Traceback" not in result.stderr
