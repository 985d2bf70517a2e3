"""Staged rollouts: rings of stores, a failure threshold that halts by itself, resume and fleet-wide rollback.

A rollout is a JSON record in head office's rollout directory (one file per rollout, replaced atomically), so
``storelink hq release status/resume/rollback`` can pick it up from another shell or after a crash:

    {"id", "version", "release": {version, url, sha256, size}, "rings": [{"name", "stores"}], "threshold",
     "ring": <index of the ring in progress>, "status": running|halted|done|rolled_back, "reason",
     "stores": {store: {"ring", "state", "reason", "from", "version"}}}

The controller sends the signed ``update`` command to every store of a ring at once and follows the stores'
retained ``update/state``. A store counts as failed when it refuses the command, reports ``rolled_back`` or
``failed``, or has no outcome within the ring timeout. As soon as a ring's failures exceed ``threshold`` (a
fraction of the ring), the rollout halts: no further ring gets the release until someone resumes it.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storelink.system.files import write_atomically

TERMINAL = {"healthy", "rolled_back", "failed"}


class RolloutError(Exception):
    pass


def load_rings(path: Path) -> tuple[list[dict[str, Any]], float | None]:
    """A rings file: ``fleet = [...]``, optional ``threshold``, and ``[[ring]]`` tables with ``name`` and either
    ``stores = [...]`` or ``percent = N`` (of the fleet, taken in order from the stores not in an earlier ring)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise RolloutError(f"{path}: {err}") from None
    fleet = [str(s) for s in data.get("fleet", [])]
    rings, used = [], set()
    for i, ring in enumerate(data.get("ring", [])):
        name = str(ring.get("name") or f"ring{i + 1}")
        if "stores" in ring:
            stores = [str(s) for s in ring["stores"] if str(s) not in used]
        elif "percent" in ring:
            rest = [s for s in fleet if s not in used]
            stores = rest[:math.ceil(len(fleet) * float(ring["percent"]) / 100)]
        else:
            raise RolloutError(f"{path}: ring {name!r} needs stores = [...] or percent = N")
        used |= set(stores)
        rings.append({"name": name, "stores": stores})
    if not rings:
        raise RolloutError(f"{path}: no [[ring]] tables")
    threshold = data.get("threshold")
    return rings, float(threshold) if threshold is not None else None


@dataclass
class Rollout:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path, rollout_id: str) -> Rollout:
        path = directory / f"{rollout_id}.json"
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise RolloutError(f"no readable rollout {rollout_id!r} in {directory}: {err}") from None

    @classmethod
    def latest(cls, directory: Path) -> Rollout | None:
        files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        return cls(files[-1], json.loads(files[-1].read_text())) if files else None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode(), 0o640)

    @property
    def id(self) -> str:
        return str(self.data["id"])

    def store_row(self, store: str) -> dict[str, Any]:
        return self.data["stores"].setdefault(store, {"state": "pending"})  # type: ignore[no-any-return]

    def failures(self, ring: int) -> list[str]:
        return [s for s in self.data["rings"][ring]["stores"]
                if self.store_row(s).get("state") in ("rolled_back", "failed", "refused", "timeout")]

    def progress(self) -> dict[str, Any]:
        rows = self.data["stores"].values()
        count = {k: sum(1 for r in rows if r.get("state") == k) for k in
                 ("healthy", "rolled_back", "failed", "refused", "timeout")}
        total = sum(len(r["stores"]) for r in self.data["rings"])
        return {"status": self.data["status"], "ring": f"{self.data['ring'] + 1}/{len(self.data['rings'])}",
                "ring_name": self.data["rings"][min(self.data["ring"], len(self.data["rings"]) - 1)]["name"],
                "stores": total, **count, "reason": self.data.get("reason")}


# Sends one command to one store and returns its reply (ok, error); provided by storelink.hq.release over MQTT.
SendFn = Callable[[str, dict[str, Any]], dict[str, Any] | None]
StatesFn = Callable[[], dict[str, dict[str, Any]]]


def run_rollout(rollout: Rollout, send: SendFn, states: StatesFn, *, ring_timeout: float,
                say: Callable[[str], None] = print, poll: float = 0.5) -> str:
    """Drive the rollout from its current ring to done or halted; returns the final status."""
    data = rollout.data
    while data["ring"] < len(data["rings"]):
        index = data["ring"]
        ring = data["rings"][index]
        say(f"ring {index + 1}/{len(data['rings'])} {ring['name']!r}: {len(ring['stores'])} store(s)")
        live = states()
        for store in ring["stores"]:
            row = rollout.store_row(store)
            if row.get("state") in TERMINAL and row.get("version") == data["version"]:
                continue  # a resumed rollout does not re-send to stores that are done
            row.update(ring=index, state="sent", reason=None, **{"from": (live.get(store) or {}).get("version")})
            reply = send(store, {"action": "install", "release": data["release"], "rollout": rollout.id,
                                 "allow_irreversible": data.get("allow_irreversible", False),
                                 "ignore_window": data.get("ignore_window", False)})
            result = (reply or {}).get("result") or {}
            if reply is None:
                row.update(state="timeout", reason="no reply to the update command")
            elif not reply.get("ok"):
                row.update(state="refused", reason=str(reply.get("error")))
            elif result.get("state") == "healthy" and result.get("version") == data["version"]:
                # Already running this release: the store starts no update, so its update/state never names this
                # rollout; waiting for it would only end in the ring's timeout.
                row.update(state="healthy", reason=result.get("note"), version=data["version"])
        rollout.save()
        halted = _follow_ring(rollout, index, states, ring_timeout, say, poll)
        rollout.save()
        if halted:
            return "halted"
        data["ring"] = index + 1
        rollout.save()
    data["status"], data["reason"] = "done", None
    rollout.save()
    say(f"rollout {rollout.id} done: {json.dumps(rollout.progress())}")
    return "done"


def _follow_ring(rollout: Rollout, index: int, states: StatesFn, timeout: float, say: Callable[[str], None],
                 poll: float) -> bool:
    data = rollout.data
    ring = data["rings"][index]
    allowed = data["threshold"] * len(ring["stores"])
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        live = states()
        for store in ring["stores"]:
            state, row = live.get(store) or {}, rollout.store_row(store)
            if row["state"] in ("refused", "timeout") or row["state"] in TERMINAL:
                continue
            if state.get("rollout") == rollout.id:
                row.update(state=state.get("state"), reason=state.get("reason"), version=state.get("version"))
            if row["state"] not in TERMINAL:
                waiting.append(store)
            elif row["state"] != "healthy":
                say(f"  {store}: {row['state']}: {row.get('reason')}")
        failed = rollout.failures(index)
        if len(failed) > allowed:
            data["status"] = "halted"
            data["reason"] = (f"ring {ring['name']!r}: {len(failed)} of {len(ring['stores'])} stores failed "
                              f"(threshold {data['threshold']:.0%}): " + ", ".join(
                                  f"{s} ({rollout.store_row(s)['state']}: {rollout.store_row(s).get('reason')})"
                                  for s in sorted(failed)))
            say(f"HALTED: {data['reason']}")
            return True
        if not waiting:
            return False
        if time.monotonic() >= deadline:
            for store in waiting:
                rollout.store_row(store).update(state="timeout", reason=f"no outcome within {timeout:g} s")
            continue  # re-evaluate the threshold with the timeouts counted
        time.sleep(poll)
