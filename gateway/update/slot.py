"""The OS half of updates: mark the booted RAUC slot good only once the gateway on it is healthy.

RAUC installs a new root filesystem into the inactive slot and boots it on trial (U-Boot's boot counter on the
Pi 4, the firmware's ``tryboot`` on the Pi 5: image/rauc/). ``storelink-mark-good.service`` runs this after each
boot. Three outcomes:

- healthy (the same gate as application updates, without a baseline: running, no health problems, broker
  connected): ``rauc status mark-good``; the slot is kept;
- the gateway itself is not healthy by the deadline (does not answer, crashes, reports problems):
  ``rauc status mark-bad``, and the unit's ``FailureAction=reboot`` boots the other slot;
- only the broker is unreachable (the store's line is down): neither. A trial slot stays unconfirmed, so the
  next reboot falls back to the known-good one; a store with no line never loses a working OS over it.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import time

from storelink import __version__
from storelink.config import GatewayConfig
from storelink.update.health import fetch_status, problems
from storelink.update.updater import status_url

log = logging.getLogger(__name__)


def _rauc(rauc: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shlex.split(rauc), *args], capture_output=True, text=True, timeout=120, check=False)


def mark_booted_slot(config: GatewayConfig, *, wait: float, rauc: str = "rauc", poll: float = 2.0) -> int:
    url = status_url(config)
    deadline = time.monotonic() + wait
    local: list[str] = ["no status yet"]
    while time.monotonic() < deadline:
        status = fetch_status(url)
        version = str((status or {}).get("version") or __version__)
        local = problems(status, version, {"connected": False}, None)
        remote = problems(status, version, {"connected": True}, None)
        if not remote:
            result = _rauc(rauc, "status", "mark-good", "booted")
            if result.returncode != 0:
                log.error("rauc status mark-good failed: %s", result.stderr.strip())
                return 1
            log.info("gateway %s healthy: booted slot marked good", version)
            return 0
        time.sleep(poll)
    if local:
        log.error("gateway not healthy on this slot (%s): marking it bad", "; ".join(local))
        result = _rauc(rauc, "status", "mark-bad", "booted")
        if result.returncode != 0:
            log.error("rauc status mark-bad failed: %s", result.stderr.strip())
        return 1
    log.warning("gateway healthy but the broker is unreachable: the slot stays unconfirmed (next boot falls back)")
    return 2
