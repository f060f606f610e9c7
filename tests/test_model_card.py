"""Model cards: every published global and every export carries a README.md saying what it is.

The card is parsed back with huggingface_hub's own ``ModelCard`` (what the Hub shows), and the
Hub store is checked to upload it as the repo's README.md.
"""

from __future__ import annotations

from pathlib import Path

from e2e_harness import build_subnet, domain_config
from huggingface_hub import ModelCard as HubModelCard

from connito.library.model_card import (
    MODEL_CARD_FILE,
    ModelCard,
    base_model_license,
    render_model_card,
    write_model_card,
)
from connito.protocol.phases import phase_bounds

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def _card(**overrides) -> ModelCard:
    fields = {
        "title": "connito math global, cycle 3",
        "domain": "math",
        "model_id": "allenai/OLMoE-1B-7B-0924",
        "model_revision": "a" * 40,
        "license": "apache-2.0",
        "selection_digest": "b" * 64,
        "cycle": 3,
        "revision": "c" * 64,
        "parent": "d" * 64,
        "decision": "merged",
        "contributors": ((HOTKEY, 0.75), ("5other", 0.25)),
        "losses": {"held-out domain loss, this global": 2.5, "held-out general loss, this global": None},
    }
    return ModelCard(**{**fields, **overrides})


def test_card_metadata_is_what_the_hub_reads() -> None:
    parsed = HubModelCard(render_model_card(_card()))
    assert parsed.data.license == "apache-2.0"
    assert parsed.data.base_model == "allenai/OLMoE-1B-7B-0924"
    assert "domain:math" in parsed.data.tags
    for fact in ("a" * 40, "b" * 64, "| cycle | 3 |", "d" * 64, f"`{HOTKEY}` | 0.7500", "2.5000", "n/a"):
        assert fact in parsed.text, fact


def test_owner_evals_appear_only_when_present() -> None:
    assert "Owner evaluations" not in render_model_card(_card())
    text = render_model_card(_card(owner_evals=({"task": "gsm8k", "accuracy": 0.41},)))
    assert "## Owner evaluations" in text and '"accuracy": 0.41' in text


def test_license_comes_from_the_base_models_card(tmp_path: Path) -> None:
    assert base_model_license(tmp_path) == "other"
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [moe]\n---\n# base\n")
    assert base_model_license(tmp_path) == "mit"
    unknown = render_model_card(_card(license="other", model_id="inline:qwen3_moe"))
    assert "unknown: the base model declares none" in unknown and "base_model" not in unknown


def test_hub_store_uploads_the_card_as_the_repo_readme(monkeypatch, tmp_path: Path) -> None:
    from hub_server import running_hub

    from connito.hub import HfHubStore

    folder = tmp_path / "global"
    folder.mkdir()
    (folder / "experts.safetensors").write_bytes(b"x" * 64)
    write_model_card(_card(), folder)
    with running_hub(monkeypatch, tmp_path / "hf_home") as server:
        store = HfHubStore(token=None, endpoint=server.url, max_retries=0, backoff_s=0.0)
        ref = store.upload(folder, repo="lead/global", files=("experts.safetensors", MODEL_CARD_FILE))
        files = server.files_at("lead/global", ref.revision)
    assert HubModelCard(files["README.md"].decode()).data.license == "apache-2.0"


def test_published_global_carries_its_card(tmp_path: Path) -> None:
    """The lead's cycle-0 publication in the store has a README.md naming the cycle and contributors."""
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    subnet.run_until(phase_bounds(0, "merge", config.cycle)[1])
    lead = subnet.nodes["v0"]
    record = lead.global_state.record
    assert record is not None, "cycle 0 published nothing"
    (revision_dir,) = (tmp_path / "hub" / "nodes" / "v0").iterdir()
    card = HubModelCard((revision_dir / "README.md").read_text())
    assert "| cycle | 0 |" in card.text and lead.global_state.revision in card.text
    for contributor in record.inputs:
        assert contributor.hotkey in card.text
