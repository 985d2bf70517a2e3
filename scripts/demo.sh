#!/usr/bin/env bash
# One command for a newcomer: installs what the demo needs (Mosquitto from Debian, StoreLink into .venv) and runs
# `storelink demo`: its own broker, simulated devices, the status page, and the head-office commands to try.
# Arguments go to `storelink demo` (--seconds N stops it by itself, --verbose shows every MQTT message).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
    bash scripts/apt-install.sh mosquitto
    # Debian enables a system-wide broker on port 1883 with the package; the demo runs its own on a free port.
    if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
        SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
        $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
        echo "(stopped and disabled Debian's mosquitto service: the demo runs its own broker)"
    fi
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[demo]'
exec .venv/bin/storelink demo "$@"
