"""Replay protection survives a restart: a captured signed command, config or price batch, sent again after the
gateway was killed and restarted, is refused. Plus the bounds of the command record (storelink.remote.replay)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from storelink.remote.replay import Replayed, ReplayGuard
from storelink.remote.signing import keygen
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, wait_for
from tests.hq_helpers import STORE, HeadOffice, base_config, desired, signed_command, start_gateway
from tests.prices_helpers import Publisher, batch, items, wait_event


def test_captured_command_config_and_prices_are_refused_after_a_restart(tmp_path: Path, mosquitto: Mosquitto,
                                                                        subscriber: Subscriber) -> None:
    key = keygen()
    pos = tmp_path / "pos"
    pos.mkdir()
    device = f'[[devices]]\nid = "pos1"\ndriver = "plu_file"\ndirectory = "{pos}"\n'
    gw = start_gateway(tmp_path, mosquitto.port, key, device)
    hq, prices = HeadOffice(mosquitto.port), Publisher(mosquitto.port)
    restarted: GatewayProcess | None = None
    try:
        gw.wait_online(10)
        command = signed_command(key, "restart-device", {"device": "pos1"})
        assert hq.command("restart-device", command)["ok"]
        cfg = base_config(tmp_path, mosquitto.port, key, gw.http_port,
                          devices=[{"id": "pos1", "driver": "plu_file", "directory": str(pos)}])
        old_config = desired(key, 5, cfg)
        hq.publish(f"storelink/{STORE}/config/desired", old_config, retain=True)
        wait_for(lambda: gw.get("/api/v1/status")[1]["config"]["version"] == 5, 15, what="config v5")
        hq.publish(f"storelink/{STORE}/config/desired", desired(key, 6, cfg), retain=True)
        wait_for(lambda: gw.get("/api/v1/status")[1]["config"]["version"] == 6, 15, what="config v6")
        price_batch = batch(key, 1, items(5))
        prices.batch(price_batch)
        wait_event(subscriber, "price.committed", version=1)

        gw.kill9()
        restarted = GatewayProcess(gw.config, gw.http_port).start()
        restarted.wait_online(15)

        again = hq.command("restart-device", command)
        assert not again["ok"] and again["code"] == "unauthorized", again
        assert "already used" in again["error"] and "replay" in again["error"]
        assert restarted.get("/api/v1/status")[1]["devices"][0]["restarts"] == 0  # it did not run again

        mark = len(subscriber.messages)
        hq.publish(f"storelink/{STORE}/config/desired", old_config, retain=True)
        report = wait_for(lambda: next((json.loads(p) for t, p, _r in subscriber.messages[mark:]
                                        if t == f"storelink/{STORE}/config/reported"
                                        and json.loads(p)["version"] == 5), None), 15, what="report on v5")
        assert report["status"] == "rejected" and "not newer" in report["errors"]["version"]
        assert restarted.get("/api/v1/status")[1]["config"]["version"] == 6

        prices.batch(price_batch)
        wait_event(subscriber, "price.rejected", reason="replayed", batch_id=price_batch.batch_id)
    finally:
        hq.close()
        prices.close()
        gw.stop()
        if restarted is not None:
            restarted.stop()


def test_record_is_bounded_and_forgetting_never_reopens_a_replay(tmp_path: Path) -> None:
    path = tmp_path / "replay-guard.json"
    guard = ReplayGuard(path, max_entries=3)
    guard.load()
    now = time.time()
    with pytest.raises(Replayed, match="before the oldest"):
        guard.accept("queued-before-first-start", now - 5, 300)  # no record yet: the past is refused
    for i in range(5):
        guard.accept(f"cmd-{i}", now + i * 0.001, 300)
    assert len(json.loads(path.read_text())["seen"]) == 3  # bounded
    for i in range(5):  # the two forgotten ones are below the floor: still refused
        with pytest.raises(Replayed):
            guard.accept(f"cmd-{i}", now + i * 0.001, 300)
    with pytest.raises(Replayed, match="outside the last 300s"):
        guard.accept("old", now - 3600, 300)

    again = ReplayGuard(path, max_entries=3)  # a restart
    again.load()
    with pytest.raises(Replayed, match="already used"):
        again.accept("cmd-4", now + 0.004, 300)
    again.accept("cmd-5", time.time(), 300)

    path.write_text("{garbage")
    broken = ReplayGuard(path)
    broken.load()  # fails closed: nothing issued before now
    with pytest.raises(Replayed):
        broken.accept("cmd-6", time.time() - 1, 300)
