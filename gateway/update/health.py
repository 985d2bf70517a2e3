"""The health gate a new release must pass, and the crash-loop rule: the decisions, kept apart from the I/O.

Healthy means, judged from the gateway's own status API (``GET /api/v1/status``):
- the process answers, runs the expected version, ``state`` is ``running`` and ``/healthz``'s problems are none;
- the broker is connected, if it was connected before the switch (a store that was offline when the update
  started must not roll back a good release because its line is still down);
- the outbox drains: it is empty, or it delivered something since the release started;
- every device that was ``ok`` before the switch is ``ok`` again.
It must hold for ``healthy_for`` seconds in a row, within the deadline. A crash loop (the supervisor restarted
the gateway ``crash_loop_restarts`` times since the switch) fails the gate at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


def baseline_of(status: dict[str, Any] | None) -> dict[str, Any]:
    """What was ok before the switch (from the running release's status)."""
    if not status:
        return {"connected": False, "devices_ok": []}
    devices = status.get("devices") or []
    return {
        "connected": bool((status.get("uplink") or {}).get("connected")),
        "devices_ok": sorted(d["device"] for d in devices if isinstance(d, dict) and d.get("state") == "ok"),
    }


def problems(status: dict[str, Any] | None, version: str, baseline: dict[str, Any],
             delivered_at_start: int | None) -> list[str]:
    """Why ``status`` is not (yet) healthy for release ``version``; empty when it is."""
    if status is None:
        return ["the gateway does not answer its status API"]
    out: list[str] = []
    if status.get("version") != version:
        out.append(f"running version {status.get('version')!r}, not {version}")
    if status.get("state") != "running":
        out.append(f"state is {status.get('state')!r}")
    out += [f"health: {p}" for p in status.get("health_problems") or []]
    uplink = status.get("uplink") or {}
    if baseline.get("connected") and not uplink.get("connected"):
        out.append(f"broker not connected ({uplink.get('last_error') or 'no connection yet'})")
    outbox = status.get("outbox") or {}
    depth, delivered = int(outbox.get("depth") or 0), int(outbox.get("delivered_total") or 0)
    if depth and baseline.get("connected") and (delivered_at_start is None or delivered <= delivered_at_start):
        out.append(f"outbox not draining ({depth} waiting, nothing delivered since the start)")
    states = {d.get("device"): d.get("state") for d in status.get("devices") or [] if isinstance(d, dict)}
    for device in baseline.get("devices_ok") or []:
        if states.get(device) != "ok":
            out.append(f"device {device} was ok before the update, now {states.get(device) or 'missing'}")
    return out


@dataclass
class Gate:
    """Feed it status snapshots and restart counts; it says when the verdict is in."""

    version: str
    baseline: dict[str, Any]
    deadline: float  # time.time()
    healthy_for: float
    crash_loop_restarts: int
    restarts_at_switch: int
    healthy_since: float | None = None
    delivered_at_start: int | None = None
    started_at: str | None = None
    last_problems: list[str] = field(default_factory=list)

    def observe(self, status: dict[str, Any] | None, restarts: int, now: float | None = None) -> str | None:
        """None while undecided; ``"healthy"``; or the reason it failed."""
        now = time.time() if now is None else now
        crashes = restarts - self.restarts_at_switch
        if crashes >= self.crash_loop_restarts:
            return f"crash loop: the gateway was restarted {crashes} times since the switch"
        if status is not None and status.get("version") == self.version:
            # The delivered counter is per process: a new process (crash, restart) starts a new count.
            if status.get("started_at") != self.started_at:
                self.started_at = status.get("started_at")
                self.delivered_at_start = int((status.get("outbox") or {}).get("delivered_total") or 0)
                self.healthy_since = None
        found = problems(status, self.version, self.baseline, self.delivered_at_start)
        if found:
            self.healthy_since = None
            self.last_problems = found
        elif self.healthy_since is None:
            self.healthy_since = now
        if not found and self.healthy_since is not None and now - self.healthy_since >= self.healthy_for:
            return "healthy"
        if now >= self.deadline:
            return "not healthy within the deadline: " + "; ".join(self.last_problems or ["no status"])
        return None


def fetch_status(base_url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """The gateway's status document with ``/healthz``'s problems merged in; None when it does not answer."""
    try:
        with urllib.request.urlopen(base_url + "/api/v1/status", timeout=timeout) as resp:
            status = json.loads(resp.read())
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=timeout) as resp:
                health = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            health = json.loads(err.read() or b"{}")
    except (OSError, ValueError):
        return None
    if isinstance(status, dict):
        status["health_problems"] = list((health or {}).get("problems") or [])
        return status
    return None
