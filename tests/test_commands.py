"""Commands over MQTT against a real broker and a real `storelink run`: MQTT 5 response topic + correlation data,
the 3.1.1 fallback, signatures for commands that change something, replay refusal, and errors never crashes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from storelink.remote.signing import keygen
from tests.helpers import Mosquitto, Subscriber, wait_for
from tests.hq_helpers import STORE, HeadOffice, signed_command, start_gateway


def test_commands_answer_with_results_or_clear_errors(tmp_path: Path, mosquitto: Mosquitto,
                                                      subscriber: Subscriber) -> None:
    key, stranger = keygen(), keygen()
    pos = tmp_path / "pos"
    pos.mkdir()
    gw = start_gateway(tmp_path, mosquitto.port, key,
                       f'[[devices]]\nid = "pos1"\ndriver = "plu_file"\ndirectory = "{pos}"\n')
    hq = HeadOffice(mosquitto.port)
    try:
        gw.wait_online(10, what="connected")
        pong = hq.command("ping", {})
        assert pong["ok"] and pong["result"]["pong"] is True
        status = hq.command("status", {"args": {}})
        assert status["ok"] and status["result"]["store_id"] == STORE

        def err(name: str, body: object) -> tuple[str, str]:
            r = hq.command(name, body)  # type: ignore[arg-type]
            assert not r["ok"], r
            return r["code"], r["error"]

        assert err("self-destruct", {})[0] == "unknown_command"
        assert err("ping", {"args": {"x": 1}}) == ("bad_args", "x: unknown key")
        assert err("ping", {"args": [1]})[0] == "bad_request"
        assert err("restart-device", {"args": {"device": "pos1"}})[0] == "unauthorized"  # unsigned
        code, msg = err("restart-device", signed_command(stranger, "restart-device", {"device": "pos1"}))
        assert code == "unauthorized" and "unknown key_id" in msg
        code, msg = err("restart-device", signed_command(key, "ping", {}))
        assert code == "unauthorized" and "signed for command 'ping'" in msg
        code, msg = err("restart-device", signed_command(key, "restart-device", {"device": "pos1"},
                                                         issued_at=time.time() - 3600))
        assert code == "unauthorized" and "replay" in msg
        code, msg = err("restart-device", signed_command(key, "restart-device", {"device": "nope"}))
        assert code == "bad_args" and "pos1" in msg
        code, msg = err("reprint-labels", signed_command(key, "reprint-labels", {"skus": ["A1"], "all": True}))
        assert code == "bad_args" and "either skus" in msg
        code, msg = err("reprint-labels", signed_command(key, "reprint-labels", {"all": True}))
        assert code == "unavailable" and "no active price list" in msg

        # A signed restart works once; the same signed message again is a replay.
        cmd = signed_command(key, "restart-device", {"device": "pos1"})
        ok = hq.command("restart-device", cmd)
        assert ok["ok"] and ok["result"] == {"restarting": "pos1"}
        wait_for(lambda: gw.get("/api/v1/status")[1]["devices"][0]["restarts"] == 1, 10, what="restart")
        code, msg = err("restart-device", cmd)
        assert code == "unauthorized" and "already used" in msg

        # Garbage bytes get an answer too, on the reply topic.
        r = hq.command("status", {})
        assert r["ok"]
        hq.client.publish(f"storelink/{STORE}/cmd/ping", b"\xff\x00", qos=1).wait_for_publish(5)
        reply = wait_for(lambda: subscriber.json(f"storelink/{STORE}/cmd-reply/ping"), 10, what="cmd-reply")
        assert reply[-1]["code"] == "bad_request"
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        hq.close()
        gw.stop()


def test_mqtt_311_fallback_reply_to_and_correlation_id(tmp_path: Path, mosquitto: Mosquitto) -> None:
    key = keygen()
    gw = start_gateway(tmp_path, mosquitto.port, key)
    hq = HeadOffice(mosquitto.port, protocol=mqtt.MQTTv311)
    try:
        gw.wait_online(10, what="connected")
        corr = uuid.uuid4().hex
        body = {"reply_to": "hq/replies/311", "correlation_id": corr}
        hq.client.publish(f"storelink/{STORE}/cmd/ping", json.dumps(body), qos=1).wait_for_publish(5)
        signed = signed_command(key, "restart-device", {"device": "ghost"}, reply_to="hq/replies/311",
                                correlation_id="c2")
        hq.client.publish(f"storelink/{STORE}/cmd/restart-device", json.dumps(signed), qos=1).wait_for_publish(5)

        def replies() -> dict[str, dict[str, object]]:
            with hq.lock:
                return {str(r.get("correlation_id")): r for _t, _c, r in hq.replies}

        got = wait_for(lambda: (r := replies()) and corr in r and "c2" in r and r, 10, what="3.1.1 replies")
        assert got[corr]["ok"] and got[corr]["command"] == "ping"
        assert got["c2"]["code"] == "bad_args"
    finally:
        hq.close()
        gw.stop()
