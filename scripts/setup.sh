#!/usr/bin/env bash
# Create .venv and install connito with its test extras (idempotent). Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch first and pinned: the CPU wheel on these machines; any other spec pulls a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -c "import connito, pytest, hypothesis, transformers, bittensor, mypy, ruff" 2>/dev/null \
  || .venv/bin/python -m pip install --quiet -e '.[test]'
