"""The code stays as ruff formats and lints it (pinned in the test extras, so CI and a laptop agree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["connito", "tests", "scripts", "benchmarks"]


def _ruff() -> list[str]:
    # the ruff next to this interpreter (the .venv's), else one on PATH
    local = Path(sys.executable).with_name("ruff")
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return [found]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_sources_pass_ruff(args: list[str]) -> None:
    result = subprocess.run(
        [*_ruff(), *args, *SOURCES], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"ruff {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
