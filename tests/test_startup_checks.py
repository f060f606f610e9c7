"""Start-up checks: every fault a node cannot heal stops it with one line naming the file or field.

A selection built for another model (same domain name), a truncated state file, a state file
naming a missing global folder, an unknown model id and an outdated protocol version: each is
one line, never a traceback repeated at every tick.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from e2e_harness import build_subnet, domain_config
from test_neuron_cli import DOMAIN, _run, _wallet

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import ModelConfig
from connito.errors import ConfigError, StateError
from connito.ml.modeling import build_model, load_model
from connito.ml.selection_record import ExpertSelection, LayerSelection
from connito.node.miner import Miner
from connito.node.startup_checks import (
    check_selection_matches_model,
    load_state_file,
    model_experts_per_layer,
)
from connito.node.validator import Validator
from connito.node.validator_state import ValidatorState
from connito.protocol.version import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny domain's base model (2 MoE layers of 8 experts), saved as transformers saves it."""
    folder = tmp_path_factory.mktemp("base")
    build_model(domain_config().model).save_pretrained(folder)
    return folder


def _selection(**overrides) -> ExpertSelection:
    config = domain_config()
    fields = {
        "domain": config.name,
        "model_id": config.model.name,
        "model_revision": "test-base",
        "method": "token_ratio",
        "p": 0.2,
        "min_experts_per_layer": 1,
        "probe_tokens": {"domain": 16},
        "layers": (
            LayerSelection(layer=0, experts=(1, 2), scores=(0.125,) * 8),
            LayerSelection(layer=1, experts=(3,), scores=(0.125,) * 8),
        ),
    }
    return ExpertSelection(**{**fields, **overrides}).sealed()


def test_experts_per_layer_come_from_the_checkpoint_keys(base_dir: Path) -> None:
    assert model_experts_per_layer(base_dir) == {0: 8, 1: 8}


def test_matching_selection_passes(base_dir: Path) -> None:
    check_selection_matches_model(
        _selection(), selection_path=Path("sel.json"), config=domain_config(), base_dir=base_dir
    )


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"model_id": "inline:mixtral"}, "model_id", "selection is for model 'inline:mixtral'"),
        ({"method": "gate_score"}, "method", "selection method 'gate_score'"),
        (
            {"layers": (LayerSelection(layer=5, experts=(1,), scores=(0.125,) * 8),)},
            "layers.0.layer",
            "layer 5 is not an MoE layer of the base model (MoE layers: [0, 1])",
        ),
        (
            {"layers": (LayerSelection(layer=0, experts=(1,), scores=(0.0625,) * 16),)},
            "layers.0.scores",
            "layer 0 scores 16 experts, the base model has 8",
        ),
    ],
)
def test_selection_for_another_model_is_one_line_naming_file_and_field(
    base_dir: Path, overrides: dict, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_selection_matches_model(
            _selection(**overrides),
            selection_path=Path("sel.json"),
            config=domain_config(),
            base_dir=base_dir,
        )
    message = str(info.value)
    assert message.startswith(f"sel.json: {field}: ") and words in message and "\n" not in message


def test_selection_for_another_revision_of_a_hub_model_is_refused(base_dir: Path) -> None:
    config = domain_config()
    config = config.model_copy(update={"model": ModelConfig(id="org/moe", revision="abc123")})
    selection = _selection(model_id="org/moe", model_revision="def456")
    with pytest.raises(ConfigError, match="sel.json: model_revision: selection is for revision 'def456'"):
        check_selection_matches_model(
            selection, selection_path=Path("sel.json"), config=config, base_dir=base_dir
        )


def test_truncated_state_file_names_the_file_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "validator_state.json"
    good = ValidatorState().model_dump_json().encode()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(StateError) as info:
        load_state_file(path, ValidatorState)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "left untouched" in message and "\n" not in message
    assert path.read_bytes() == good[: len(good) // 2]
    assert load_state_file(tmp_path / "absent.json", ValidatorState) is None


def test_validator_and_miner_refuse_a_corrupt_state_file_with_one_line(tmp_path: Path) -> None:
    subnet = build_subnet(tmp_path, domain_config(), miners=1, validators=1)
    validator, miner = subnet.nodes["v0"], subnet.nodes["m0"]
    assert isinstance(validator, Validator) and isinstance(miner, Miner)
    validator.ctx.workdir.mkdir(parents=True, exist_ok=True)
    miner.ctx.workdir.mkdir(parents=True, exist_ok=True)
    (validator.ctx.workdir / "validator_state.json").write_text('{"global_cycle": "x"}')
    (miner.ctx.workdir / "miner_progress.json").write_text('{"cycle": 3, "checkpo')
    with pytest.raises(StateError, match=r"validator_state.json: global_cycle: "):
        Validator(validator.ctx)
    with pytest.raises(StateError, match=r"miner_progress.json: <root>: Invalid JSON"):
        Miner(miner.ctx)


def test_state_naming_a_missing_global_folder_recovers_from_chain_and_store(tmp_path: Path, caplog) -> None:
    """The lead publishes cycle 0; a validator whose global folder vanished re-adopts it, once."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=2)
    subnet.run_until(config.cycle.cycle_blocks + config.cycle.train_blocks - 1)
    v1 = subnet.nodes["v1"]
    assert isinstance(v1, Validator) and v1.state.global_cycle == 0, "cycle 0 published nothing"
    import shutil

    shutil.rmtree(v1.ctx.workdir / "global" / "0")
    restarted = Validator(dataclasses.replace(v1.ctx))
    subnet.nodes["v1"] = restarted
    subnet.run_until(config.cycle.cycle_blocks + config.cycle.train_blocks + 1)
    assert "which is missing: recovering" in caplog.text
    assert restarted.state.global_cycle == 0 and (v1.ctx.workdir / "global" / "0").is_dir()


def test_unknown_model_id_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError) as info:
        load_model("nobody/no-such-moe", ModelConfig(id="nobody/no-such-moe", revision="main"))
    message = str(info.value)
    assert message.startswith("model.id: cannot load model nobody/no-such-moe@main: ") and "\n" not in message


def test_outdated_neuron_exits_with_one_line_saying_to_upgrade(tmp_path: Path) -> None:
    wallet = _wallet(tmp_path / "wallets")
    ledger = tmp_path / "ledger.db"
    neuron = GenesisNeuron(hotkey=wallet.hotkeypub.ss58_address, stake=1.0, validator_permit=True)
    LocalChain.genesis(ledger, netuid=0, seed=1, neurons=[neuron])
    LocalChain.open(ledger).set_weights_version(PROTOCOL_VERSION + 1)
    result = _run(
        "miner.py",
        *("--config", str(DOMAIN), "--chain", f"local:{ledger}"),
        *("--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "wallets")),
        *("--workdir", str(tmp_path / "work")),
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"miner: subnet weights_version={PROTOCOL_VERSION + 1} is newer than this connito's "
        f"protocol_version={PROTOCOL_VERSION}: upgrade connito (pip install -U connito) and restart"
    ]
