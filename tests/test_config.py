"""Domain config: strict schema, one-line errors naming file, field path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from connito.config import config_digest, load_domain_config
from connito.errors import ConfigError

DOMAINS = Path(__file__).resolve().parents[1] / "configs" / "domains"


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((DOMAINS / "tiny-math.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_domain_configs_validate():
    paths = sorted(DOMAINS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny-math.yaml", "math-deepseek-v2-lite.yaml"}
    for path in paths:
        assert load_domain_config(path).name


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d["training"].update(typo_steps=3), "training.typo_steps", "unknown key"),
        (lambda d: d["merge"].update(top_n=0), "merge.top_n", "greater than or equal to 1"),
        (lambda d: d["cycle"].pop("commit_blocks"), "cycle.commit_blocks", "required field is missing"),
        (lambda d: d["data"]["train"][0].update(kind="ftp"), "data.train[0].kind", "ftp"),
        (
            lambda d: d["selection"].update(min_experts_per_layer=5, max_experts_per_layer=2),
            "selection",
            "max_experts_per_layer",
        ),
    ],
)
def test_bad_field_gives_one_line_naming_file_field_and_reason(tmp_path, mutate, field, reason):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_domain_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}")
    assert reason in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ncycle: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+: invalid YAML"):
        load_domain_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_domain_config(tmp_path / "nope.yaml")


def test_digest_changes_with_any_protocol_parameter(tmp_path):
    base = load_domain_config(DOMAINS / "tiny-math.yaml")
    changed = load_domain_config(_write(tmp_path, lambda d: d["scoring"].update(top_k=5)))
    assert config_digest(base) != config_digest(changed)
    assert config_digest(base) == config_digest(load_domain_config(DOMAINS / "tiny-math.yaml"))
