#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian / Raspberry Pi OS machine, then runs
# ruff, mypy and pytest. This is the one test command the README names and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck disable=SC2046  # one package a word, on purpose
bash scripts/apt-install.sh $(grep -v '^[[:space:]]*#' scripts/apt-packages.txt)
# The Debian package enables a system-wide broker on 1883; the tests start their own on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl stop mosquitto || true
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

echo "== ruff"; .venv/bin/ruff check gateway drivers tests bench
echo "== mypy"; bash scripts/typecheck.sh
# Files run side by side in STORELINK_TEST_WORKERS processes (default 3, also on 2 cores: most tests wait on
# brokers, gateways and timers rather than the CPU); a file's tests stay together in one worker (--dist loadfile)
# because they share module fixtures. STORELINK_TEST_WORKERS=0 runs everything in this process.
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider -n "${STORELINK_TEST_WORKERS:-3}" --dist loadfile "$@"
