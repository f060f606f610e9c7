"""Every package connito imports is declared in pyproject.toml.

An undeclared import works on the developer's machine (something else pulled it in) and breaks
a fresh ``pip install connito`` the day that something else stops depending on it. The check
parses every import in ``connito/`` with ``ast`` (lazy imports inside functions included), maps
each top-level module to its distribution, and fails naming the module and the file.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution name, for optional packages that may not be installed here
_NOT_INSTALLED = {"wandb": "wandb"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_normalise(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in specs}


def _imports(root: Path) -> dict[str, Path]:
    """Top-level module name -> the first file that imports it (absolute imports only)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


def undeclared_imports(root: Path, declared: set[str]) -> list[str]:
    """One line per third-party module imported under ``root`` whose distribution is not declared."""
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, path in sorted(_imports(root).items()):
        if module in sys.stdlib_module_names or module in ("connito", "__future__"):
            continue
        dists = distributions.get(module) or [_NOT_INSTALLED.get(module, module)]
        if not any(_normalise(d) in declared for d in dists):
            problems.append(f"{path.relative_to(root.parent)}: imports {module} (distribution {dists[0]})")
    return problems


def test_every_imported_package_is_declared() -> None:
    assert undeclared_imports(REPO / "connito", _declared()) == []


def test_an_undeclared_import_is_caught(tmp_path: Path) -> None:
    """The check can fail: a module importing an installed but undeclared package is named."""
    package = tmp_path / "connito"
    package.mkdir()
    (package / "leak.py").write_text("def f():\n    import httpx2\n")
    assert undeclared_imports(package, _declared() - {"httpx2"}) == [
        "connito/leak.py: imports httpx2 (distribution httpx2)"
    ]
