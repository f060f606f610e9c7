"""Turn a configured ``DataSource`` into documents, always through ``datasets``.

``generated`` sources come from connito's offline generators (``Dataset.from_dict``), ``hub``
sources are streamed with ``datasets.load_dataset(name, subset, split=..., revision=...,
streaming=True)`` and ``files`` sources with ``load_dataset("json" | "text" | "parquet",
data_files=..., streaming=True)`` chosen by file extension. Both read rows in order up to
``max_documents`` and write no Arrow copy of the source to any cache, so an operator's disk holds
no second copy of the data however often the sources change. Every path ends in a one-column
dataset named ``text``, capped at ``max_documents`` in source order.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import datasets

from connito.config import DataSource
from connito.data.generators import generate_documents
from connito.errors import ConfigError

__all__ = ["FILE_FORMATS", "load_source", "load_documents"]

logger = logging.getLogger(__name__)

# file extension -> datasets packaged builder
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


def load_source(source: DataSource) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one ``text`` column holding the source's documents.

    ``.txt`` files are read one document per paragraph (blank-line separated), so the hash split
    works below file granularity. Local files form a single split, so ``split`` applies to
    ``hub`` sources only.

    Raises:
        ConfigError: no matching files, mixed or unknown file types, a missing ``text_field``, or
            a dataset that cannot be loaded.
    """
    if source.kind == "generated":
        texts = generate_documents(source.name, max_documents=source.max_documents)
        return datasets.Dataset.from_dict({"text": texts})
    if source.kind == "hub":
        return _stream_hub(source)
    return _stream_files(source)


def load_documents(source: DataSource) -> list[str]:
    """The source's documents as Python strings, blank ones dropped, in source order.

    Raises:
        ConfigError: as ``load_source``, or a non-string value in ``text_field``.
    """
    documents: list[str] = []
    for row, text in enumerate(load_source(source)["text"]):
        if not isinstance(text, str):
            raise ConfigError(
                f"row {row}: expected a string, got {type(text).__name__}",
                path=source.name,
                field="text_field",
            )
        if text.strip():
            documents.append(text)
    return documents


def _stream_hub(source: DataSource) -> datasets.Dataset:
    """Stream a Hub dataset at its pinned revision, reading only the first ``max_documents``.

    Loading a split (even sliced, ``train[:N]``) downloads and converts the whole split into the
    datasets cache first; streaming reads rows in order and stops at the cap, so a node's disk
    holds no copy of the source and its memory only the documents it uses. The held-out split is
    decided per document afterwards (``connito.data.split``), never by downloading a split.
    """
    if source.revision is None:
        logger.warning(
            "data source %s has no revision: the main branch can change under the nodes; pin data.*.revision",
            source.name,
        )
    stream = _load(
        source, source.name, source.subset, split=source.split, revision=source.revision, streaming=True
    )
    return _take_text(stream, source)


def _stream_files(source: DataSource) -> datasets.Dataset:
    """Stream local ``json``/``jsonl``/``txt``/``parquet`` files (one type per source)."""
    files = sorted(p for p in glob.glob(source.name, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError("no files match this glob", path=source.name, field="name")
    formats = {FILE_FORMATS.get(Path(p).suffix.lower()) for p in files}
    if None in formats or len(formats) != 1:
        suffixes = sorted({Path(p).suffix for p in files})
        raise ConfigError(
            f"files must share one type of {sorted(FILE_FORMATS)}, got {suffixes}",
            path=source.name,
            field="name",
        )
    builder = formats.pop()
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    stream = _load(source, builder, data_files=files, split="train", streaming=True, **options)
    return _take_text(stream, source)


def _take_text(stream: datasets.IterableDataset, source: DataSource) -> datasets.Dataset:
    """The first ``max_documents`` values of ``text_field``, read row by row, as a ``text`` column."""
    columns = stream.column_names
    if columns is not None and source.text_field not in columns:
        raise ConfigError(
            f"column {source.text_field!r} not found, columns are {columns}",
            path=source.name,
            field="text_field",
        )
    rows = stream if source.max_documents is None else stream.take(source.max_documents)
    try:
        texts = [row[source.text_field] for row in rows]
    except KeyError as exc:
        raise ConfigError(
            f"column {source.text_field!r} not found in a row", path=source.name, field="text_field"
        ) from exc
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise ConfigError(
            f"cannot read dataset: {type(exc).__name__}: {str(exc)[:200]}", path=source.name
        ) from exc
    logger.debug(
        "data source streamed kind=%s name=%s revision=%s documents=%d",
        source.kind,
        source.name,
        source.revision,
        len(texts),
    )
    return datasets.Dataset.from_dict({"text": texts})


def _load(source: DataSource, *args: object, **kwargs: object):  # noqa: ANN202 - Dataset or IterableDataset
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise ConfigError(
            f"cannot load dataset: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            path=source.name,
        ) from exc
