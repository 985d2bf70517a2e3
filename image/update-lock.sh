#!/bin/bash
# Re-resolves the runtime dependencies of the storelink package and writes image/requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" ".[all]" >/dev/null
{
    echo "# Pinned runtime dependencies of the appliance image (pip constraints). Regenerate with image/update-lock.sh"
    echo "# after changing dependencies in pyproject.toml; the chroot test installs with these pins."
    "$PY" - "$report" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower() != "storelink":
        print(f"{name}=={version}")
PY
} >image/requirements.lock
echo "wrote image/requirements.lock"
