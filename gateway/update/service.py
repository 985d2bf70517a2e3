"""Who restarts the gateway after a switch, and how often it restarted since (the crash-loop signal).

The updater's decisions (storelink.update.health, storelink.update.updater) only use this small interface, so the
same code decides under systemd and under any other supervisor:

- ``SystemdService``: ``systemctl restart storelink.service``; restarts are systemd's ``NRestarts`` counter
  (``Restart=always`` in the unit restarts a crashing gateway, each one counted).
- ``PidFileService``: a supervisor that writes ``{"pid": ..., "restarts": ...}`` to a JSON file each time it
  starts the gateway, and restarts it when it exits (runit/s6-style; the end-to-end tests run such a supervisor
  as a real process). A restart is SIGTERM to the gateway, which then exits cleanly and is started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol


class ServiceError(Exception):
    pass


class ServiceManager(Protocol):
    def restart(self) -> None:
        """Stop the gateway (it commits its outbox on SIGTERM) and start it again from ``current``."""

    def restarts(self) -> int:
        """A counter that grows by one each time the supervisor restarts the gateway by itself."""


class SystemdService:
    def __init__(self, unit: str = "storelink.service", systemctl: str = "/usr/bin/systemctl"):
        self.unit = unit
        self.systemctl = systemctl

    def _run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([self.systemctl, *args], capture_output=True, text=True, timeout=300, check=False)
        if check and result.returncode != 0:
            raise ServiceError(f"systemctl {' '.join(args)}: {result.stderr.strip()[:300]}")
        return result.stdout.strip()

    def restart(self) -> None:
        # reset-failed first: a unit that hit its start limit in an earlier crash loop must be startable again.
        self._run("reset-failed", self.unit)
        # Blocking: systemd zeroes NRestarts when a start is asked for (not automatic), so the count is read only
        # once this start has been dealt with. A start that fails (the new release dies at once) is not an error
        # here: Restart=always restarts it, and those restarts are the crash loop the gate counts.
        self._run("restart", self.unit, check=False)

    def restarts(self) -> int:
        return int(self._run("show", "--property=NRestarts", "--value", self.unit) or 0)


class PidFileService:
    def __init__(self, state_file: Path):
        self.state_file = state_file

    def _state(self) -> dict[str, int]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as err:
            raise ServiceError(f"cannot read the supervisor's state {self.state_file}: {err}") from None
        return {"pid": int(data.get("pid") or 0), "restarts": int(data.get("restarts") or 0),
                "starts": int(data.get("starts") or 0)}

    def restart(self) -> None:
        state = self._state()
        if state["pid"] > 0:
            try:
                os.kill(state["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the supervisor has started it again
            if self._state()["starts"] > state["starts"]:
                return
            time.sleep(0.1)
        raise ServiceError("the supervisor did not start the gateway again within 60 s")

    def restarts(self) -> int:
        return self._state()["restarts"]


def service_from_spec(spec: str) -> ServiceManager:
    """``systemd:UNIT`` or ``pidfile:PATH`` (the ``--service`` option of ``storelink update``)."""
    kind, _, arg = spec.partition(":")
    if kind == "systemd":
        return SystemdService(arg or "storelink.service")
    if kind == "pidfile" and arg:
        return PidFileService(Path(arg))
    raise ValueError(f"--service takes systemd:UNIT or pidfile:PATH, got {spec!r}")
