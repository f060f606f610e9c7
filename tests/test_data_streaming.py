"""Hub data sources are streamed at a pinned revision and read only up to ``max_documents``.

``datasets.load_dataset`` treats a local dataset folder like a Hub repo id, so the real hub code
path (``streaming=True``, ``revision``) runs offline here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connito.config import DataSource
from connito.data.sources import load_documents
from connito.errors import ConfigError


def _dataset_folder(root: Path, rows: int) -> Path:
    folder = root / "gsm-like"
    (folder / "data").mkdir(parents=True)
    lines = [json.dumps({"question": f"question {i}: 2 + {i}?", "answer": str(2 + i)}) for i in range(rows)]
    (folder / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_hub_source_streams_only_max_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = _dataset_folder(tmp_path, rows=5000)
    source = DataSource(kind="hub", name=str(folder), text_field="question", max_documents=7)
    documents = load_documents(source)
    assert documents == [f"question {i}: 2 + {i}?" for i in range(7)]
    assert not list((tmp_path / "cache").rglob("*.arrow")), "streaming wrote an Arrow copy of the source"
    assert "has no revision" in caplog.text  # an unpinned source is named in one WARNING


def test_hub_source_missing_column_is_one_line(tmp_path: Path) -> None:
    source = DataSource(
        kind="hub", name=str(_dataset_folder(tmp_path, rows=3)), text_field="body", revision="main"
    )
    with pytest.raises(ConfigError) as info:
        load_documents(source)
    assert "column 'body' not found" in str(info.value) and "\n" not in str(info.value)
