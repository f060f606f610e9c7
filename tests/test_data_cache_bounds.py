"""An operator's caches stay bounded: no Arrow copy of any source, LRU-bounded token caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from connito.config import DataSource
from connito.data.packing import TOKEN_CACHE_ENTRIES, tokenize_documents
from connito.data.sources import load_documents
from connito.data.tokenizer import TOKENIZER_CACHE_ENTRIES, load_or_train_bpe_tokenizer
from connito.fsutil import keep_newest


def test_files_source_writes_nothing_to_the_datasets_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local json files are streamed like Hub sources: read row by row, no Arrow copy anywhere."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [json.dumps({"text": f"document {i} " * 20}) for i in range(3000)]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    source = DataSource(kind="files", name=str(tmp_path / "data.jsonl"), max_documents=5)

    documents = load_documents(source)

    assert documents == [f"document {i} " * 20 for i in range(5)]
    written = [p for p in (tmp_path / "datasets-cache").rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix == ".arrow"], written


def test_keep_newest_deletes_the_least_recently_used(tmp_path: Path) -> None:
    for i in range(6):
        path = tmp_path / f"entry-{i}.npz"
        path.write_bytes(b"x")
        os.utime(path, (1_000 + i, 1_000 + i))
    (tmp_path / "other.txt").write_bytes(b"kept: not matched")
    os.utime(tmp_path / "entry-0.npz", (5_000, 5_000))  # read recently: the newest now

    deleted = keep_newest(tmp_path, keep=3, pattern="*.npz")

    assert sorted(p.name for p in deleted) == ["entry-1.npz", "entry-2.npz", "entry-3.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "entry-0.npz",
        "entry-4.npz",
        "entry-5.npz",
        "other.txt",
    ]
    assert keep_newest(tmp_path / "missing", keep=1) == []


def test_token_cache_stays_bounded_and_keeps_what_is_read(tmp_path: Path) -> None:
    """A node whose data keeps changing holds at most TOKEN_CACHE_ENTRIES token files."""
    tokenizer = load_or_train_bpe_tokenizer(
        [f"the sum of {i} and {i + 1} is {2 * i + 1}" for i in range(200)], vocab_size=300, cache_dir=tmp_path
    )
    tokens = tmp_path / "tokens"
    first = tokenize_documents(["kept document"], tokenizer, cache_dir=tmp_path)
    kept = next(tokens.glob("*.npz"))
    for i in range(TOKEN_CACHE_ENTRIES + 8):
        os.utime(kept, (2_000_000_000, 2_000_000_000))  # read on every "start": most recently used
        tokenize_documents([f"changing document {i}"], tokenizer, cache_dir=tmp_path)
        assert len(list(tokens.glob("*.npz"))) <= TOKEN_CACHE_ENTRIES

    assert kept.is_file()
    again = tokenize_documents(["kept document"], tokenizer, cache_dir=tmp_path)
    assert again.tokens.tolist() == first.tokens.tolist()


def test_tokenizer_cache_stays_bounded(tmp_path: Path) -> None:
    for i in range(TOKENIZER_CACHE_ENTRIES + 2):
        load_or_train_bpe_tokenizer(
            [f"corpus {i} word {j}" for j in range(50)], vocab_size=280, cache_dir=tmp_path
        )
    assert len(list((tmp_path / "tokenizer").glob("bpe-*"))) == TOKENIZER_CACHE_ENTRIES
