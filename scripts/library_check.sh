#!/usr/bin/env bash
# The expert-library check after a localnet run: one library version per published cycle with
# lineage, and right-sized exports at several keep fractions (default 0.25 0.5 0.125), each loaded
# back with plain transformers. Writes DIR/library.json, DIR/export-F/ + DIR/export-F.json and
# DIR/library_check.json; exits 1 if a check fails.
#
#   bash scripts/library_check.sh DIR [FRACTION ...]
#
# DIR is a `connito localnet --workdir DIR` folder. A run made before validators recorded into
# DIR/library is first rebuilt from its chain ledger and hub (`connito library rebuild`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/library_check.sh DIR [FRACTION ...]" >&2; exit 2; }
DIR=$(realpath "$1"); shift
FRACTIONS=("$@"); [ ${#FRACTIONS[@]} -gt 0 ] || FRACTIONS=(0.25 0.5 0.125)
PY=.venv/bin/python
CONNITO=.venv/bin/connito
LIB="$DIR/library"
DOMAIN=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$DIR/domain.yaml")

if [ ! -f "$LIB/index.sqlite" ]; then
  echo "[library-check] no $LIB/index.sqlite: rebuilding it from the run's chain and hub"
  $CONNITO library rebuild --config "$DIR/domain.yaml" --chain "local:$DIR/chain.sqlite" --hub "local:$DIR/hub" \
    --selection "$DIR/selection.json" --base "$DIR/base" --cache-dir "$DIR/cache" --library "$LIB"
fi
$CONNITO library list --library "$LIB"
$CONNITO library list --library "$LIB" --json > "$DIR/library.json"
for fraction in "${FRACTIONS[@]}"; do
  echo "[library-check] export keep-fraction $fraction"
  $CONNITO export --library "$LIB" --domain "$DOMAIN" --keep-fraction "$fraction" --out "$DIR/export-$fraction" \
    --cache-dir "$DIR/cache" --json > "$DIR/export-$fraction.json"
done

exec $PY - "$DIR" "${FRACTIONS[@]}" <<'EOF'
"""Summarise and check: versions vs published cycles, and each export loaded by plain transformers."""
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

workdir, fractions = Path(sys.argv[1]), sys.argv[2:]
versions = json.loads((workdir / "library.json").read_text())["versions"]
report = json.loads((workdir / "report.json").read_text()) if (workdir / "report.json").exists() else None
checks = {}
if report is not None:
    published = [c["cycle"] for c in report["cycles"] if c.get("decision") in ("merged", "best_single")]
    checks["one version per published cycle"] = sorted(v["cycle"] for v in versions) == published
lineage = all(v["contributors"] and v["merge_record_sha256"] for v in versions) and all(
    v["parent"] == versions[i - 1]["name"] for i, v in enumerate(versions) if i > 0
)
checks["lineage (contributors, merge record, parent chain)"] = bool(versions) and lineage
rows = []
for fraction in fractions:
    export = json.loads((workdir / f"export-{fraction}.json").read_text())
    AutoModelForCausalLM.from_pretrained(workdir / f"export-{fraction}")  # no connito code involved
    AutoTokenizer.from_pretrained(workdir / f"export-{fraction}")
    rows.append(export)
    print(
        f"keep {fraction:>6}: {export['kept_per_layer']}/{export['num_experts']} experts per layer, "
        f"expert params {export['expert_param_fraction']:.1%}, all params {export['param_fraction']:.1%}, "
        f"domain loss {export['domain_loss_exported']:.4f} vs full {export['domain_loss_full']:.4f} "
        f"({export['domain_loss_change']:+.2%})"
    )
    if float(fraction) == 0.25:
        checks["0.25: < 40% of expert params"] = export["expert_param_fraction"] < 0.40
        checks["0.25: domain loss within 5% of full"] = export["domain_loss_change"] <= 0.05
for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}  {name}")
summary = {"versions": [v["name"] for v in versions], "exports": rows, "checks": checks}
(workdir / "library_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {workdir / 'library_check.json'}")
sys.exit(0 if all(checks.values()) else 1)
EOF
