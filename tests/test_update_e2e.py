"""Fleet updates end to end, every part a real process: a gateway running release N under a supervisor that
plays systemd, head office's `storelink hq release publish`, an HTTPS server with the bundles, the root-side
updater started by the supervisor when the gateway leaves a pending.json, a real Mosquitto, and a till posting
sales the whole time.

N -> N+1: installed into a temp root, switched, healthy. N+2 that never reaches the broker: rolled back by
itself to N+1 after the health deadline. N+3 that crash-loops: rolled back at the third restart. Head office
hears each outcome; every sale accepted with a 202 reaches head office.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from storelink.remote.signing import KeyPair
from tests.helpers import STORELINK, Mosquitto, Subscriber, free_port, wait_for
from tests.hq_helpers import HeadOffice, signed_command
from tests.release_helpers import HttpsFileServer, ReleaseKit, Supervisor
from tests.tls_certs import make_pki

pytestmark = pytest.mark.slow
STORE = "store-0042"
BROKEN = {"gateway/app.py": (  # a release whose uplink can never reach the broker: fails its health gate
    "        self.topics = self.uplink.topics\n",
    "        self.topics = self.uplink.topics\n"
    "        self.uplink.cfg = self.uplink.cfg.model_copy(update={'port': 1})\n")}
CRASHING = {"gateway/cli.py": (  # a release that dies at every start: a crash loop
    "    cfg = load_config(config_path)\n", "    raise SystemExit(3)\n")}


class Till(threading.Thread):
    """Posts a sale every 20 ms; retries while the gateway restarts; remembers every id it got a 202 for."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.accepted: list[str] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            body = json.dumps({"kind": "sale", "device": "till1", "data": {"n": n}}).encode()
            req = urllib.request.Request(self.url + "/api/v1/events", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    self.accepted.append(json.loads(resp.read())["id"])
                    n += 1
            except (OSError, urllib.error.HTTPError, ValueError):
                self.refused += 1  # the gateway is restarting: the till keeps the sale and tries again
            self.stop.wait(0.02)


class Store:
    def __init__(self, tmp: Path, broker: Mosquitto, key: KeyPair, ca: Path):
        self.root = tmp / "root"
        self.http_port = free_port()
        self.key_file = tmp / "hq.key"
        self.key_file.write_text(key.private_b64)
        (tmp / "hq.pub").write_text(key.public_b64)
        (tmp / "pos").mkdir()
        self.config = tmp / "storelink.toml"
        self.config.write_text(
            f'store_id = "{STORE}"\ngroups = ["north"]\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min = 0.2\nreconnect_max = 1.0\n'
            f'[storage]\npath = "{self.root}/var/lib/storelink/storelink.db"\n'
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            f'[trust]\npublic_keys = ["{key.public_b64}"]\n'
            f'[update]\nhealth_deadline = 15\nhealthy_for = 2\ncrash_loop_restarts = 3\nca = "{ca}"\n'
            f'[[devices]]\nid = "pos"\ndriver = "plu_file"\ndirectory = "{tmp / "pos"}"\n')
        self.update_dir = self.root / "var/lib/storelink/update"
        self.current = self.root / "opt/storelink/current/bin/storelink"

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/v1/status", timeout=3) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def healthy_on(self, version: str) -> bool:
        s = self.status()
        return bool(s and s["version"] == version and s["uplink"]["subscribed"]
                    and all(d["state"] == "ok" for d in s["devices"]))


def publish(bundle: Path, server: HttpsFileServer, store: Store, broker: Mosquitto, tmp: Path) -> tuple[int, str]:
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    result = subprocess.run(
        [STORELINK, "hq", "release", "publish", str(bundle), "--url", server.url(bundle.name), "--store", STORE,
         "--key", str(store.key_file), "--broker", f"127.0.0.1:{broker.port}", "--rollouts", str(tmp / "rollouts"),
         "--ring-timeout", "120"], capture_output=True, text=True, timeout=180)
    return result.returncode, result.stdout + result.stderr


killed: list[int] = []


def kill_updater_mid_trial(store: Store, sup: Supervisor) -> None:
    def on_trial() -> bool:
        s = store.status()
        return bool((store.update_dir / "trial.json").exists() and s and s["version"] == "1.0.2")

    wait_for(on_trial, 120, what="release 1.0.2 on trial")
    pid = sup.data()["updater_pid"]
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


def test_update_then_health_gate_and_crash_loop_rollbacks(tmp_path: Path, mosquitto: Mosquitto, hq_key: KeyPair,
                                                          release_kit: ReleaseKit) -> None:
    started = time.monotonic()
    key, kit = hq_key, release_kit
    pki = make_pki(tmp_path)
    (tmp_path / "www").mkdir()
    server = HttpsFileServer(tmp_path / "www", pki)
    store = Store(tmp_path, mosquitto, key, pki["ca"])
    seed = subprocess.run([STORELINK, "update", "seed", str(kit.bundle("1.0.0")), "--root", str(store.root),
                           "--trust", str(tmp_path / "hq.pub")], capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr
    hq = Subscriber(mosquitto.port)
    sup = Supervisor(tmp_path, [str(store.current), "run", "--config", str(store.config)], store.update_dir,
                     [str(store.current), "update", "apply", "--config", str(store.config), "--root", str(store.root),
                      "--service", f"pidfile:{tmp_path / 'supervisor.json'}"])
    till = Till(f"http://127.0.0.1:{store.http_port}")
    try:
        wait_for(lambda: store.healthy_on("1.0.0"), 30, what="release 1.0.0 running and connected")
        till.start()

        # N -> N+1: downloaded, verified, installed into the temp root, switched, restarted, healthy.
        rc, out = publish(kit.bundle("1.0.1"), server, store, mosquitto, tmp_path)
        assert rc == 0, out
        assert os.readlink(store.root / "opt/storelink/releases/current") == "1.0.1"
        wait_for(lambda: store.healthy_on("1.0.1"), 20, what="1.0.1 healthy")
        assert sorted(p.name for p in (store.root / "opt/storelink/releases").iterdir()) == ["1.0.0", "1.0.1",
                                                                                          "current"]

        # N+2 never reaches the broker: the gate fails at the deadline and the updater goes back by itself,
        # even though the updater itself is killed (kill -9) in the middle of the trial: the path unit starts it
        # again because trial.json is still there, and it judges the trial from where it was.
        killer = threading.Thread(target=kill_updater_mid_trial, args=(store, sup), daemon=True)
        killer.start()
        rc, out = publish(kit.bundle("1.0.2", BROKEN), server, store, mosquitto, tmp_path)
        killer.join(5)
        assert killed, "the updater was killed during the trial"
        assert rc == 3 and "HALTED" in out, out
        assert "broker not connected" in out, out
        assert os.readlink(store.root / "opt/storelink/releases/current") == "1.0.1"
        wait_for(lambda: store.healthy_on("1.0.1"), 20, what="1.0.1 back after the rollback")

        # N+3 crash-loops: rolled back at the third restart, without waiting for the deadline.
        t0 = time.monotonic()
        rc, out = publish(kit.bundle("1.0.3", CRASHING), server, store, mosquitto, tmp_path)
        assert rc == 3 and "crash loop" in out, out
        crash_rollback_s = time.monotonic() - t0
        wait_for(lambda: store.healthy_on("1.0.1"), 20, what="1.0.1 back after the crash loop")

        # The same release again is refused: it was rolled back here before.
        ho = HeadOffice(mosquitto.port)
        reply = ho.command("update", signed_command(key, "update", {"action": "install", "release": {
            "version": "1.0.3", "url": server.url("x"), "sha256": "0" * 64, "size": 1}}))
        ho.close()
        assert not reply["ok"] and "rolled back" in reply["error"], reply

        till.stop.set()
        till.join(10)
        wait_for(lambda: store.status() and store.status()["outbox"]["depth"] == 0, 30,  # type: ignore[index]
                 what="the outbox drained")
        delivered = {e["id"] for e in hq.events(STORE)}
        lost = [i for i in till.accepted if i not in delivered]
        assert len(till.accepted) > 100 and not lost, f"{len(lost)} of {len(till.accepted)} accepted sales lost"
        kinds = [e["kind"] for e in hq.events(STORE) if e["kind"].startswith("update.")]
        assert kinds.count("update.healthy") == 1 and kinds.count("update.rolled_back") == 2, kinds
        reasons = [e["data"]["reason"] for e in hq.events(STORE) if e["kind"] == "update.rolled_back"]
        assert "broker not connected" in reasons[0] and "crash loop" in reasons[1], reasons
        status = subprocess.run([STORELINK, "hq", "release", "status", "--json", "--broker",
                                 f"127.0.0.1:{mosquitto.port}", "--rollouts", str(tmp_path / "rollouts"),
                                 "--listen", "1"], capture_output=True, text=True, timeout=60)
        doc = json.loads(status.stdout)
        row = next(r for r in doc["stores"] if r["store"] == STORE)
        assert (row["version"], row["state"], row["target"]) == ("1.0.1", "rolled_back", "1.0.3"), row
        assert doc["rollout"]["status"] == "halted" and doc["rollout"]["rolled_back"] == 1, doc
        print(f"end to end: {time.monotonic() - started:.0f} s; crash-loop rollback {crash_rollback_s:.1f} s; "
              f"{len(till.accepted)} sales, {till.refused} retried while restarting; restarts "
              f"{sup.data().get('restarts')}")
    finally:
        till.stop.set()
        sup.stop()
        hq.close()
        server.close()
        log = tmp_path / "gateway.log"
        if log.exists():
            print(log.read_text()[-6000:])
