#!/usr/bin/env bash
# The test command: installs what it needs (idempotent), then runs the whole offline suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -c "import connito, pytest, hypothesis" 2>/dev/null \
  || .venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
