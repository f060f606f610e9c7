"""The code stays as ruff formats and lints it and as mypy types it (tools pinned in the test extras,
so CI and a laptop agree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["connito", "tests", "scripts", "benchmarks"]


def _tool(name: str) -> str:
    # the tool next to this interpreter (the .venv's), else one on PATH
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", *SOURCES], ["ruff", "format", "--check", *SOURCES], ["mypy"]],
    ids=["ruff-lint", "ruff-format", "mypy"],
)
def test_sources_pass(command: list[str]) -> None:
    # mypy reads its targets and settings from pyproject.toml ([tool.mypy])
    result = subprocess.run(
        [_tool(command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
