"""Staged rollouts through the real `storelink hq release` commands against a real Mosquitto and 10 simulated
stores (drivers/sim/update_store.py, which check the signed command like a gateway): rings, the failure
threshold halting the rollout by itself, status, resume, and a fleet-wide rollback."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storelink.drivers.sim.update_store import SimulatedStore
from storelink.hq.rollout import Rollout, run_rollout
from storelink.remote.signing import KeyPair
from tests.helpers import STORELINK, Mosquitto, wait_for
from tests.release_helpers import IRREVERSIBLE, ReleaseKit

FLEET = [f"s{i:02d}" for i in range(1, 11)]
NORTH = {"s01", "s02", "s05"}
FAILING = {"s03": "not healthy within the deadline: device pos was ok before the update, now offline",
           "s04": "crash loop: the gateway was restarted 3 times since the switch"}


@pytest.fixture
def fleet(mosquitto: Mosquitto, hq_key: KeyPair) -> Iterator[dict[str, SimulatedStore]]:
    stores = {s: SimulatedStore(s, mosquitto.port, [hq_key.public_b64], fail_with=FAILING.get(s),
                                groups=["north"] if s in NORTH else ["south"]) for s in FLEET}
    yield stores
    for store in stores.values():
        store.close()


def hq(tmp_path: Path, mosquitto: Mosquitto, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORELINK, "hq", "release", *args, "--broker", f"127.0.0.1:{mosquitto.port}",
                           "--rollouts", str(tmp_path / "rollouts")], capture_output=True, text=True, timeout=120)


def status(tmp_path: Path, mosquitto: Mosquitto) -> dict[str, Any]:
    result = hq(tmp_path, mosquitto, "status", "--json", "--listen", "0.5")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_rollout_halts_at_the_threshold_then_resumes_and_rolls_back(
        tmp_path: Path, mosquitto: Mosquitto, hq_key: KeyPair, release_kit: ReleaseKit,
        fleet: dict[str, SimulatedStore]) -> None:
    key = tmp_path / "hq.key"
    key.write_text(hq_key.private_b64)
    rings = tmp_path / "rings.toml"
    rings.write_text(f"fleet = {json.dumps(FLEET)}\nthreshold = 0.34\n"
                     '[[ring]]\nname = "lab"\nstores = ["s01"]\n'
                     '[[ring]]\nname = "canary"\npercent = 30\n'
                     '[[ring]]\nname = "all"\npercent = 100\n')
    bundle = release_kit.bundle("2.0.0")
    url = "https://releases.example.invalid/storelink-2.0.0.bundle"

    result = hq(tmp_path, mosquitto, "publish", str(bundle), "--url", url, "--rings", str(rings), "--key", str(key),
                "--ring-timeout", "30")
    out = result.stdout + result.stderr
    assert result.returncode == 3 and "HALTED: ring 'canary': 2 of 3 stores failed" in out, out
    assert "s03 (rolled_back: not healthy within the deadline" in out and "s04 (rolled_back: crash loop" in out
    assert all(not fleet[s].commands for s in FLEET[4:]), "no store of the next ring got the release"
    doc = status(tmp_path, mosquitto)
    progress = doc["rollout"]
    assert (progress["status"], progress["ring"], progress["ring_name"]) == ("halted", "2/3", "canary"), progress
    assert (progress["healthy"], progress["rolled_back"], progress["stores"]) == (2, 2, 10), progress
    rows = {r["store"]: r for r in doc["stores"]}
    assert {s: rows[s]["version"] for s in ("s01", "s02", "s03", "s05")} == {
        "s01": "2.0.0", "s02": "2.0.0", "s03": "1.0.0", "s05": "1.0.0"}
    assert rows["s04"]["state"] == "rolled_back" and "crash loop" in rows["s04"]["reason"]
    assert rows["s05"]["state"] == "idle"

    result = hq(tmp_path, mosquitto, "resume", progress["id"], "--key", str(key), "--ring-timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: all(fleet[s].version == "2.0.0" for s in FLEET[4:]), 10, what="ring 'all' updated")
    assert status(tmp_path, mosquitto)["rollout"]["status"] == "done"

    result = hq(tmp_path, mosquitto, "rollback", progress["id"], "--key", str(key), "--listen", "0.5")
    assert result.returncode == 0 and result.stdout.count(": back to 1.0.0: sent") == 8, result.stdout + result.stderr
    wait_for(lambda: all(s.version == "1.0.0" for s in fleet.values()), 10, what="the fleet back on 1.0.0")
    back = [c for s in FLEET if s not in FAILING for c in fleet[s].commands if c["action"] == "rollback"]
    assert len(back) == 8 and {c["version"] for c in back} == {"1.0.0"}
    assert not [c for s in FAILING for c in fleet[s].commands if c["action"] == "rollback"], \
        "stores that had already rolled back are not sent back again"
    assert status(tmp_path, mosquitto)["rollout"]["status"] == "rolled_back"


def test_publish_refuses_a_bundle_it_cannot_verify(tmp_path: Path, mosquitto: Mosquitto, release_kit: ReleaseKit
                                                   ) -> None:
    other = tmp_path / "other.key"
    other.write_text("A" * 43 + "=")  # a valid Ed25519 seed, but not the key that signed the bundle
    result = hq(tmp_path, mosquitto, "publish", str(release_kit.bundle("2.0.0")), "--url", "https://x.invalid/b",
                "--store", "s01", "--key", str(other))
    assert result.returncode == 1 and "unknown key_id" in result.stderr and "nothing was published" in result.stderr


def test_publish_to_a_group_reaches_exactly_its_stores(tmp_path: Path, mosquitto: Mosquitto, hq_key: KeyPair,
                                                       release_kit: ReleaseKit, fleet: dict[str, SimulatedStore]
                                                       ) -> None:
    key = tmp_path / "hq.key"
    key.write_text(hq_key.private_b64)
    result = hq(tmp_path, mosquitto, "publish", str(release_kit.bundle("2.0.0")), "--url", "https://x.invalid/b",
                "--group", "north", "--key", str(key), "--ring-timeout", "30", "--listen", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {s for s, sim in fleet.items() if sim.commands} == NORTH
    assert {s for s, sim in fleet.items() if sim.version == "2.0.0"} == NORTH
    # Head office's side of irreversible releases: compared with the last completed rollout (the one above).
    irreversible = release_kit.bundle("3.0.0", IRREVERSIBLE)
    refused = hq(tmp_path, mosquitto, "publish", str(irreversible), "--url", "https://x.invalid/c", "--group",
                 "north", "--key", str(key), "--listen", "1")
    assert refused.returncode == 1 and "cannot be rolled back past: outbox: schema 2" in refused.stderr
    assert "--allow-irreversible" in refused.stderr and {len(sim.commands) for sim in fleet.values()} <= {0, 1}
    allowed = hq(tmp_path, mosquitto, "publish", str(irreversible), "--url", "https://x.invalid/c", "--group",
                 "north", "--key", str(key), "--listen", "1", "--allow-irreversible", "--ring-timeout", "30")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert all(fleet[s].commands[-1]["allow_irreversible"] for s in NORTH)


def test_a_store_already_on_the_release_counts_as_healthy_at_once(tmp_path: Path) -> None:
    """A store that already runs the published release answers `healthy` ("already running") and starts nothing,
    so its update/state never names the rollout: it is healthy from its reply, not a timeout at the ring's end."""
    rollout = Rollout(tmp_path / "r1.json", {
        "id": "r1", "version": "1.2.0", "release": {"version": "1.2.0"}, "threshold": 0.0, "ring": 0,
        "status": "running", "reason": None, "stores": {},
        "rings": [{"name": "pilot", "stores": ["store-a"]}, {"name": "rest", "stores": ["store-b"]}]})
    sent: list[str] = []

    def send(store: str, _body: dict[str, Any]) -> dict[str, Any]:
        sent.append(store)
        return {"ok": True, "result": {"state": "healthy", "version": "1.2.0", "note": "already running"}}

    def states() -> dict[str, dict[str, Any]]:
        return {s: {"version": "1.2.0", "state": "idle", "rollout": None} for s in ("store-a", "store-b")}

    started = time.monotonic()
    assert run_rollout(rollout, send, states, ring_timeout=30, poll=0.05, say=lambda _line: None) == "done"
    assert time.monotonic() - started < 5 and sent == ["store-a", "store-b"]
    assert {s: r["state"] for s, r in rollout.data["stores"].items()} == {"store-a": "healthy", "store-b": "healthy"}
