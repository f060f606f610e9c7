#!/usr/bin/env bash
# The main job: the whole subnet on this machine with the embedded defaults (extra args go to connito localnet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/connito localnet --config configs/domains/tiny-math.yaml --miners 3 --validators 2 --cycles 3 \
  --adversaries copy,nan,lazy,stale,heldout,sybil,replay,scaled "$@"
