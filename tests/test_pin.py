"""``connito pin`` writes the commit shas the Hub names now, keeping the YAML's comments."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer, running_hub

from connito.cli import main
from connito.config import load_domain_config
from connito.errors import ConfigError
from connito.hub.base import is_commit_sha
from connito.owner.pin import pin_domain, resolve_with_hub

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "domains" / "math-olmoe-1b-7b.yaml"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with running_hub(monkeypatch, tmp_path / "hf_home") as server:
        server.add_commit("allenai/OLMoE-1B-7B-0924", {"config.json": b"{}"})
        server.add_commit("datasets/openai/gsm8k", {"main/train.parquet": b"v1"})
        server.add_commit("datasets/Salesforce/wikitext", {"train.parquet": b"w1"})
        yield server


def _unpinned_text() -> str:
    """The shipped config as an owner starts it: model on ``main``, sources without a revision."""
    text = SHIPPED.read_text(encoding="utf-8")
    text = re.sub(r"(\n  revision: )[0-9a-f]{40}", r"\1main", text)
    return re.sub(r", revision: [0-9a-f]{40}\}", "}", text)


def _copy_shipped(tmp_path: Path) -> Path:
    path = tmp_path / "domain.yaml"
    path.write_text(_unpinned_text(), encoding="utf-8")
    return path


@pytest.mark.parametrize("path", sorted(SHIPPED.parent.glob("math-*.yaml")), ids=lambda p: p.stem)
def test_shipped_real_configs_are_pinned(path: Path) -> None:
    """Every Hub reference of a shipped real domain names a commit, so all nodes read the same bytes."""
    config = load_domain_config(path)
    assert is_commit_sha(config.model.revision)
    sources = config.data.train + config.data.validation + config.data.general
    assert [s.name for s in sources if s.kind == "hub" and not is_commit_sha(s.revision)] == []


def _env(hub: HubServer) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url}


def test_pin_writes_current_shas_and_keeps_comments(hub: HubServer, tmp_path: Path) -> None:
    path = _copy_shipped(tmp_path)
    before = path.read_text(encoding="utf-8")
    model_sha = hub.add_commit("allenai/OLMoE-1B-7B-0924", {"README.md": b"newer"})
    gsm_sha = hub.add_commit("datasets/openai/gsm8k", {"main/test.parquet": b"t"})

    pins = pin_domain(path, resolve_with_hub(_env(hub)))

    config = load_domain_config(path)
    assert config.model.revision == model_sha
    assert [s.revision for s in config.data.train + config.data.validation] == [gsm_sha, gsm_sha]
    wiki_sha = config.data.general[0].revision
    assert wiki_sha is not None and len(wiki_sha) == 40 and wiki_sha != gsm_sha
    assert {p.field for p in pins} == {
        "model.revision",
        "data.train[0].revision",
        "data.validation[0].revision",
        "data.general[0].revision",
    }
    after = path.read_text(encoding="utf-8")
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert all(comment in after for comment in comments)  # every comment survives
    assert len(after.splitlines()) == len(before.splitlines())
    # a second run finds nothing to do and leaves the file alone
    assert pin_domain(path, resolve_with_hub(_env(hub))) == []
    assert path.read_text(encoding="utf-8") == after


def test_pinned_config_ignores_later_pushes(hub: HubServer, tmp_path: Path) -> None:
    path = _copy_shipped(tmp_path)
    pin_domain(path, resolve_with_hub(_env(hub)))
    pinned = load_domain_config(path)
    hub.add_commit("datasets/openai/gsm8k", {"main/train.parquet": b"moved upstream"})
    assert pin_domain(path, resolve_with_hub(_env(hub))) == []
    assert load_domain_config(path) == pinned


def test_unknown_dataset_is_one_line_and_writes_nothing(hub: HubServer, tmp_path: Path) -> None:
    path = _copy_shipped(tmp_path)
    text = path.read_text(encoding="utf-8").replace("Salesforce/wikitext", "nobody/nothing")
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        pin_domain(path, resolve_with_hub(_env(hub)))

    message = str(info.value)
    assert message.startswith(f"{path}: data source nobody/nothing: dataset nobody/nothing@main not found")
    assert "\n" not in message
    assert path.read_text(encoding="utf-8") == text


def test_block_style_source_is_refused_with_the_shas_to_set(tmp_path: Path) -> None:
    """A layout the textual edit cannot place is refused with the values, never half-written."""
    path = _copy_shipped(tmp_path)
    text = path.read_text(encoding="utf-8").replace(
        "    - {kind: hub, name: Salesforce/wikitext, subset: wikitext-2-raw-v1, split: train}",
        "    - kind: hub\n      name: Salesforce/wikitext\n      subset: wikitext-2-raw-v1\n      split: train",
    )
    path.write_text(text, encoding="utf-8")
    sha = "ab" * 20

    with pytest.raises(ConfigError) as info:
        pin_domain(path, lambda kind, repo, revision: sha)

    assert "data.general[0].revision" in str(info.value) and sha in str(info.value)
    assert path.read_text(encoding="utf-8") == text


def test_cli_pins_to_out(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _copy_shipped(tmp_path)
    out = tmp_path / "pinned.yaml"

    assert main(["pin", "--config", str(path), "--out", str(out)]) == 0

    assert path.read_text(encoding="utf-8") == _unpinned_text()
    assert load_domain_config(out).model.revision != "main"
    printed = capsys.readouterr().out
    assert "model.revision: allenai/OLMoE-1B-7B-0924@main -> " in printed


def test_a_source_already_at_a_commit_is_left_alone(hub: HubServer, tmp_path: Path) -> None:
    """Two sources of one repo, one pinned by hand to an older commit: only the other moves."""
    old_sha = hub.add_commit("datasets/openai/gsm8k", {"main/test.parquet": b"old"})
    new_sha = hub.add_commit("datasets/openai/gsm8k", {"main/test.parquet": b"new"})
    path = _copy_shipped(tmp_path)
    text = path.read_text(encoding="utf-8").replace(
        "split: test, text_field: answer}", f"split: test, text_field: answer, revision: {old_sha}}}"
    )
    path.write_text(text, encoding="utf-8")

    pins = pin_domain(path, resolve_with_hub(_env(hub)))

    config = load_domain_config(path)
    assert config.data.validation[0].revision == old_sha  # the owner's pin stands
    assert config.data.train[0].revision == new_sha
    assert "data.validation[0].revision" not in {p.field for p in pins}
