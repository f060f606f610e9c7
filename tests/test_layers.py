"""The package's folders are its layers, and imports only point down.

Every import in ``connito/`` is parsed with ``ast`` (function-level and ``TYPE_CHECKING`` imports
included) and checked against the table below: the ML core knows no chain, store, protocol,
library or neuron; the protocol knows no neuron; the library knows no neuron; adapters move bytes
and never load torch; the core never talks to bittensor or the Hub itself. A new top-level room
must be placed in the table before it can land.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "connito"
MAX_MODULE_LINES = 500

_LEAVES = {"config", "errors", "fsutil"}
_ADAPTERS = {"chain", "hub"}
_CORE = {"data", "ml"}

# room -> the rooms it may import (its own room always allowed)
ALLOWED: dict[str, set[str]] = {
    "config": {"errors"},
    "errors": set(),
    "fsutil": set(),
    "chain": _LEAVES,
    "hub": _LEAVES,
    "data": _LEAVES,
    "ml": _LEAVES | {"data"},
    "protocol": _LEAVES | _CORE | _ADAPTERS,
    "library": _LEAVES | _CORE | _ADAPTERS | {"protocol"},
    "owner": _LEAVES | _CORE | _ADAPTERS | {"protocol", "library"},
    "node": _LEAVES | _CORE | _ADAPTERS | {"protocol", "library"},
    "localnet": _LEAVES | _CORE | _ADAPTERS | {"protocol", "library", "owner", "node"},
    "cli": _LEAVES | _CORE | _ADAPTERS | {"protocol", "library", "owner", "node", "localnet"},
    "__init__": set(),
}

# room -> third-party packages it must never import
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "chain": {"torch", "transformers", "safetensors"},
    "hub": {"torch", "transformers", "safetensors"},
    "ml": {"bittensor", "huggingface_hub"},
    "data": {"bittensor"},
}


def _room(module: str) -> str:
    """``connito.ml.moe`` -> ``ml``; ``connito.config`` -> ``config``; ``connito`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line number."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def layer_violations(root: Path) -> list[str]:
    """One line per import that runs against the table, or per module the table does not place."""
    problems: list[str] = []
    top = root.name
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        room = _room(module)
        where = path.relative_to(root.parent)
        if room not in ALLOWED:
            problems.append(f"{where}: room {room!r} has no place in the layer table (tests/test_layers.py)")
            continue
        for line, imported in _imports(path, module):
            head = imported.split(".")[0]
            if head == top:
                target = _room(imported)
                if target != room and target not in ALLOWED[room] and target != "__init__":
                    problems.append(f"{where}:{line}: {room} imports {imported} (a {target} module)")
            elif head in FORBIDDEN_THIRD_PARTY.get(room, set()):
                problems.append(f"{where}:{line}: {room} imports {imported}")
    return problems


def test_imports_only_point_down() -> None:
    """No module under connito/ imports a layer above its own."""
    assert layer_violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("room", "source", "expected"),
    [
        ("ml", "from connito.protocol.phases import phase\n", "ml imports connito.protocol.phases"),
        ("ml", "def f():\n    import connito.node.miner\n", "ml imports connito.node.miner"),
        ("ml", "from connito.chain.base import Chain\n", "ml imports connito.chain.base"),
        ("protocol", "from ..node.context import NodeContext\n", "protocol imports connito.node.context"),
        ("library", "from connito.node import context\n", "library imports connito.node"),
        ("hub", "import torch\n", "hub imports torch"),
        ("ml", "from huggingface_hub import HfApi\n", "ml imports huggingface_hub"),
        ("newroom", "x = 1\n", "room 'newroom' has no place"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, room: str, source: str, expected: str) -> None:
    """The checker finds a planted upward import (absolute, relative, inside a function)."""
    root = tmp_path / "connito"
    (root / room).mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / room / "planted.py").write_text(source)
    problems = layer_violations(root)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_downward_import_is_allowed(tmp_path: Path) -> None:
    root = tmp_path / "connito"
    (root / "node").mkdir(parents=True)
    (root / "node" / "planted.py").write_text(
        "from connito.ml.moe import moe_layers\nfrom connito.protocol import phases\nimport torch\n"
    )
    assert layer_violations(root) == []


def test_no_module_outgrows_a_room() -> None:
    """Each module keeps to one job: none under connito/ is over 500 lines."""
    long = {
        str(p.relative_to(REPO)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these rooms along their jobs: {long}"
