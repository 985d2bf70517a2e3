"""Remote config against a real broker and a real `storelink run`: signed, validated, applied live, saved
atomically as last-known-good, reported; bad configs rejected with the running config untouched; a config that
loses the broker is rolled back."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from storelink.config import load_config
from storelink.remote.signing import keygen, sign
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for
from tests.hq_helpers import STORE, HeadOffice, base_config, desired, start_gateway

DESIRED = f"storelink/{STORE}/config/desired"
REPORTED = f"storelink/{STORE}/config/reported"


def reports(sub: Subscriber) -> list[dict[str, Any]]:
    return sub.json(REPORTED)


def wait_report(sub: Subscriber, status: str, version: int | None, after: int = 0) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in reports(sub)[after:] if r["status"] == status and r["version"] == version), None)

    return wait_for(find, 15, what=f"config/reported {status} v{version}")  # type: ignore[no-any-return]


def test_signed_config_is_applied_live_saved_and_reported(tmp_path: Path, mosquitto: Mosquitto,
                                                         subscriber: Subscriber) -> None:
    key = keygen()
    gw = start_gateway(tmp_path, mosquitto.port, key)
    hq = HeadOffice(mosquitto.port)
    try:
        gw.wait_online(10, what="connected")
        http_port = gw.http_port
        plu_dir = tmp_path / "pos"
        plu_dir.mkdir()
        cfg = base_config(tmp_path, mosquitto.port, key, http_port,
                          logging={"level": "DEBUG"},
                          devices=[{"id": "pos1", "driver": "plu_file", "directory": str(plu_dir)}])
        del cfg["http"]["token"]  # left out: the store keeps its own secret
        hq.publish(DESIRED, desired(key, 7, cfg), retain=True)
        rep = wait_report(subscriber, "applied", 7)
        assert rep["running_version"] == 7 and rep["errors"] == {}
        assert set(rep["changed"]) >= {"devices", "logging", "config_version"}
        # Live: the new device runs without a restart of the gateway.
        status = wait_for(lambda: (s := gw.get("/api/v1/status")[1]) and s["devices"] and s, 10, what="device")
        assert [d["device"] for d in status["devices"]] == ["pos1"]
        assert status["config"]["version"] == 7
        # Saved atomically as the last-known-good file, which loads as the same config, token kept.
        saved = load_config(gw.config)
        assert saved.config_version == 7 and saved.http.token == "t" * 24
        assert not list(tmp_path.glob(".storelink.toml.tmp-*"))
        wait_for(lambda: any(e["kind"] == "config.applied" for e in subscriber.events(STORE)), 10,
                 what="the config.applied event")

        # The retained desired is delivered again after a restart: a no-op, not a second report.
        n = len(reports(subscriber))
        gw.terminate()
        gw.start()
        gw.wait_online(10, what="reconnected")
        assert gw.get("/api/v1/status")[1]["config"]["version"] == 7
        wait_for(lambda: gw.get("/api/v1/status")[1]["devices"], 10, what="device after restart")
        assert all(r["status"] == "applied" and r["version"] == 7 for r in reports(subscriber)[n:])
    finally:
        hq.close()
        gw.stop()


def test_unsigned_invalid_foreign_and_older_configs_are_rejected(tmp_path: Path, mosquitto: Mosquitto,
                                                                 subscriber: Subscriber) -> None:
    key, stranger = keygen(), keygen()
    gw = start_gateway(tmp_path, mosquitto.port, key)
    hq = HeadOffice(mosquitto.port)
    original = gw.config.read_text()
    try:
        gw.wait_online(10, what="connected")
        good = base_config(tmp_path, mosquitto.port, key, gw.http_port)
        cases: list[tuple[bytes, int | None, str, str]] = [
            (json.dumps({"kind": "storelink.config", "store_id": STORE, "version": 5, "config": good}).encode(),
             None, "signature", "not signed"),
            (desired(stranger, 5, good), None, "signature", "unknown key_id"),
            (b"\x00garbage", None, "signature", "not JSON"),
            (desired(key, 5, {**good, "mqtt": {**good["mqtt"], "prot": 1883}}), 5, "mqtt.prot", "unknown key"),
            (desired(key, 5, {**good, "devices": [{"id": "x", "driver": "no_such_driver"}]}), 5,
             "devices[0] (id='x').driver", "no_such_driver"),
            (desired(key, 5, good, store="store-9999"), 5, "store_id", "store-9999"),
            (desired(key, 5, {**good, "trust": {"public_keys": []}}), 5, "trust.public_keys", "never"),
            (json.dumps(sign({"kind": "storelink.prices", "version": 5}, key.private_b64)).encode(), None, "kind",
             "storelink.config"),
        ]
        for payload, version, key_name, text in cases:
            n = len(reports(subscriber))
            hq.publish(DESIRED, payload, retain=True)
            rep = wait_report(subscriber, "rejected", version, after=n)
            assert key_name in rep["errors"], rep
            assert text in rep["errors"][key_name], rep
            assert rep["running_version"] == 0
        # An older version than the running one is rejected too.
        hq.publish(DESIRED, desired(key, 9, good), retain=True)
        wait_report(subscriber, "applied", 9)
        n = len(reports(subscriber))
        hq.publish(DESIRED, desired(key, 8, good), retain=True)
        rep = wait_report(subscriber, "rejected", 8, after=n)
        assert "not newer" in rep["errors"]["version"]
        assert load_config(gw.config).config_version == 9
        assert gw.proc is not None and gw.proc.poll() is None  # nothing crashed the gateway
        assert original != gw.config.read_text()
    finally:
        hq.close()
        gw.stop()


def test_config_that_loses_the_broker_is_rolled_back(tmp_path: Path, mosquitto: Mosquitto,
                                                     subscriber: Subscriber) -> None:
    key = keygen()
    gw = start_gateway(tmp_path, mosquitto.port, key)
    hq = HeadOffice(mosquitto.port)
    before = gw.config.read_text()
    try:
        gw.wait_online(10, what="connected")
        dead_port = free_port()
        bad = base_config(tmp_path, dead_port, key, gw.http_port)
        hq.publish(DESIRED, desired(key, 3, bad), retain=True)
        # The gateway goes to the dead broker...
        wait_for(lambda: not gw.get("/api/v1/status")[1]["uplink"]["connected"], 10, what="disconnect")
        status = gw.get("/api/v1/status")[1]
        assert status["uplink"]["broker"] == f"127.0.0.1:{dead_port}"
        assert status["config"]["trial"]["version"] == 3
        # ...and comes back on its own, and says so once connected.
        rep = wait_report(subscriber, "rolled_back", 3)
        assert "rolled back to version 0" in rep["errors"]["mqtt"] and rep["running_version"] == 0
        status = gw.get("/api/v1/status")[1]
        assert status["uplink"]["connected"] and status["uplink"]["broker"] == f"127.0.0.1:{mosquitto.port}"
        assert gw.config.read_text() == before  # the last-known-good file was never replaced
        wait_for(lambda: any(e["kind"] == "config.rolled_back" for e in subscriber.events(STORE)), 10)
        # The retained bad config is not tried again after a restart; a newer good one is applied.
        gw.terminate()
        gw.start()
        gw.wait_online(10, what="reconnected")
        assert gw.get("/api/v1/status")[1]["config"]["version"] == 0
        hq.publish(DESIRED, desired(key, 4, base_config(tmp_path, mosquitto.port, key, gw.http_port)), retain=True)
        wait_report(subscriber, "applied", 4)
        assert tomllib.loads(gw.config.read_text())["config_version"] == 4
    finally:
        hq.close()
        gw.stop()


def test_killed_during_trial_restarts_on_last_known_good(tmp_path: Path, mosquitto: Mosquitto,
                                                         subscriber: Subscriber) -> None:
    key = keygen()
    gw = start_gateway(tmp_path, mosquitto.port, key)
    hq = HeadOffice(mosquitto.port)
    try:
        gw.wait_online(10, what="connected")
        bad = base_config(tmp_path, free_port(), key, gw.http_port, remote={"rollback_after": 600})
        hq.publish(DESIRED, desired(key, 2, bad), retain=True)
        wait_for(lambda: (gw.get("/api/v1/status")[1]["config"]["trial"] or {}).get("version") == 2, 10)
        gw.kill9()
        restarted = GatewayProcess(gw.config, gw.http_port).start()
        try:
            restarted.wait_online(10, what="reconnected")
            rep = wait_report(subscriber, "rolled_back", 2)
            assert "restarted" in rep["errors"]["mqtt"]
            assert restarted.get("/api/v1/status")[1]["config"]["version"] == 0
        finally:
            restarted.stop()
    finally:
        hq.close()
        gw.stop()
