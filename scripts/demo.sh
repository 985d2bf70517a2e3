#!/usr/bin/env bash
# One command for a newcomer: installs StoreLink into .venv and runs `storelink demo`
# (an embedded broker, simulated devices, the status page).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[demo]'
exec .venv/bin/storelink demo "$@"
