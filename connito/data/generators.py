"""Offline demo text, made deterministically from what Python itself ships.

Three generated sources let ``connito localnet`` and the tests run with no download:

- ``math``: templated GSM8K-like word problems with worked solutions (``math_problems``);
- ``english``: the English reference topics in the stdlib's ``pydoc_data.topics``, cut into
  documents of consecutive paragraphs;
- ``code``: the standard library's own non-test ``.py`` files (sorted by path), cut into documents
  of bounded size at top-level ``def``/``class`` boundaries where possible, evenly subsampled.

Each is a pure function of its arguments and the running Python: ``english`` and ``code`` read the
interpreter's own files, so two machines agree exactly when they run the same Python version.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from connito.data.math_problems import generate_math_documents
from connito.errors import ConfigError

__all__ = [
    "GENERATOR_NAMES",
    "MATH_DEFAULT_DOCUMENTS",
    "ENGLISH_MAX_CHARS",
    "CODE_MAX_CHARS",
    "CODE_DEFAULT_DOCUMENTS",
    "generate_documents",
]

logger = logging.getLogger(__name__)

MATH_DEFAULT_DOCUMENTS = 20_000  # math is unbounded; this is what max_documents=None yields
ENGLISH_MAX_CHARS = 1_500  # paragraphs are grouped up to this many characters per document
CODE_MAX_CHARS = 4_000  # stdlib source is cut into documents of at most this many characters
CODE_DEFAULT_DOCUMENTS = 1_000  # about 3 MB of the stdlib's 12 MB: what max_documents=None yields
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_TOP_LEVEL_STARTS = ("def ", "async def ", "class ", "@")


def generate_documents(name: str, *, max_documents: int | None = None, seed: int = 0) -> list[str]:
    """The documents of generated source ``name`` (``math``, ``english`` or ``code``), in a fixed order.

    ``seed`` drives the math generator; ``english`` and ``code`` are verbatim corpora and ignore it.
    ``max_documents=None`` means all of ``english``, ``MATH_DEFAULT_DOCUMENTS`` problems and
    ``CODE_DEFAULT_DOCUMENTS`` code chunks. For ``math`` and ``english`` a smaller cap returns a
    prefix of a larger one; for ``code`` a cap takes chunks evenly spaced over the sorted stdlib.

    Raises:
        ConfigError: unknown generator name.
    """
    if name not in _GENERATORS:
        raise ConfigError(
            f"unknown generated source {name!r}, expected one of {sorted(_GENERATORS)}", field="name"
        )
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"must be >= 1, got {max_documents}", field="max_documents")
    return _GENERATORS[name](max_documents, seed)


def _math(max_documents: int | None, seed: int) -> list[str]:
    return generate_math_documents(max_documents or MATH_DEFAULT_DOCUMENTS, seed=seed)


def _english(max_documents: int | None, seed: int) -> list[str]:
    from pydoc_data.topics import topics  # stdlib: the text behind help("keywords") and friends

    documents: list[str] = []
    for key in sorted(topics):
        paragraphs = [p.strip("\n") for p in topics[key].split("\n\n") if p.strip()]
        bounded = [
            part.rstrip("\n") for p in paragraphs for part in _bounded_lines(p + "\n", ENGLISH_MAX_CHARS)
        ]
        documents.extend(_group(bounded, ENGLISH_MAX_CHARS, joiner="\n\n"))
        if max_documents is not None and len(documents) >= max_documents:
            break
    return documents[:max_documents]


def _code(max_documents: int | None, seed: int) -> list[str]:
    documents: list[str] = []
    for path in _stdlib_sources():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("code generator skips non-utf8 file path=%s", path)
            continue
        documents.extend(_chunk_source(text, CODE_MAX_CHARS))
    count = min(max_documents or CODE_DEFAULT_DOCUMENTS, len(documents))
    # evenly spaced, so a cap samples the whole stdlib rather than its alphabetical head
    return [documents[i * len(documents) // count] for i in range(count)]


def _stdlib_sources() -> list[Path]:
    """Non-test ``.py`` files of the running stdlib, sorted by their path relative to it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    relatives: list[str] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]  # prune: site-packages is huge
        base = Path(directory).relative_to(root)
        relatives.extend(
            (base / name).as_posix()
            for name in names
            if name.endswith(".py") and not name.startswith("test_")
        )
    return [root / relative for relative in sorted(relatives)]


def _chunk_source(text: str, max_chars: int) -> list[str]:
    """Cut a source file at top-level definitions into chunks of at most ``max_chars``."""
    pieces = [part for piece in _top_level_pieces(text) for part in _bounded_lines(piece, max_chars)]
    return [chunk for chunk in _group(pieces, max_chars, joiner="") if chunk.strip()]


def _top_level_pieces(text: str) -> Iterator[str]:
    lines = text.splitlines(keepends=True)
    start = 0
    for i in range(1, len(lines)):
        if lines[i].startswith(_TOP_LEVEL_STARTS) and not lines[i - 1].startswith("@"):
            yield "".join(lines[start:i])
            start = i
    if start < len(lines):
        yield "".join(lines[start:])


def _bounded_lines(piece: str, max_chars: int) -> Iterator[str]:
    """Split one piece at line ends (and over-long lines anywhere) into parts of <= max_chars."""
    if len(piece) <= max_chars:
        yield piece
        return
    lines = [
        line[i : i + max_chars]
        for line in piece.splitlines(keepends=True)
        for i in range(0, len(line), max_chars)
    ]
    yield from _group(lines, max_chars, joiner="")


def _group(parts: list[str], max_chars: int, *, joiner: str) -> list[str]:
    """Greedily join consecutive parts while the result stays within ``max_chars``."""
    groups: list[str] = []
    current: list[str] = []
    size = 0
    for part in parts:
        if current and size + len(joiner) + len(part) > max_chars:
            groups.append(joiner.join(current))
            current, size = [], 0
        size += len(part) + (len(joiner) if current else 0)
        current.append(part)
    if current:
        groups.append(joiner.join(current))
    return groups


GENERATOR_NAMES = ("math", "english", "code")
_GENERATORS: dict[str, Callable[[int | None, int], list[str]]] = {
    "math": _math,
    "english": _english,
    "code": _code,
}
