"""The MQTT contract: docs/mqtt.md carries the schemas generated from the models, the events the outbox writes are
EventPayloads, and the suite-wide checker (tests/contract_check.py) really catches a message that breaks it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from storelink.contract import EventPayload, StatusPayload
from tests import contract_check
from tests.helpers import Mosquitto, Subscriber, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_docs_carry_the_json_schemas_generated_from_the_models() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "mqtt_schemas.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr  # run scripts/mqtt_schemas.py after changing a model


def test_the_outbox_wire_form_of_an_event_is_an_event_payload() -> None:
    data = {"text": 'quote " backslash \\ tab \t newline \n', "unicode": "Grüße ✓", "n": [1, 2.5, None, True]}
    wire = EventPayload.encode("0a1b2c", 42, "2026-11-23T09:15:02.123Z", "kiosk.session_ended", "kiosk-1.a_b",
                               json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    parsed = EventPayload.model_validate_json(wire)
    assert (parsed.id, parsed.seq, parsed.kind, parsed.device, parsed.data) == (
        "0a1b2c", 42, "kiosk.session_ended", "kiosk-1.a_b", data)
    will = StatusPayload(state="offline", store_id="store-0042", groups=["north"]).encode()  # the uplink's Last Will
    assert StatusPayload.model_validate_json(will).groups == ["north"]


def test_the_suite_checker_catches_what_breaks_the_contract(mosquitto: Mosquitto) -> None:
    sub = Subscriber(mosquitto.port)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="contract-test", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        contract_check.take()
        base = "storelink/store-x"
        good_event = {"id": "e1", "seq": 1, "ts": "2026-11-23T09:15:02.123Z", "kind": "sale", "device": "till-1",
                      "data": {}}
        messages = [
            (f"{base}/status", {"state": "online", "store_id": "store-x", "uptime": 3}),  # unknown field
            (f"{base}/events/sale", {**good_event, "seq": 0}),  # seq starts at 1
            (f"{base}/events/scan", good_event),  # a sale on the scan topic
            (f"{base}/devices/till-1/state", {"device": "till-1", "driver": "till_tcp", "state": "ok"}),  # no since
            (f"{base}/events/sale", good_event),  # fine
            (f"{base}/prices/batch", {"type": "anything"}),  # downlink: not the gateway's to get right
        ]
        for topic, body in messages:
            pub.publish(topic, json.dumps(body), qos=1).wait_for_publish(5)
        wait_for(lambda: len(sub.messages) == len(messages), 10, what="every message at the subscriber")
        _checked, problems = contract_check.take()
        assert len(problems) == 4, problems
        assert [p.split(":")[0] for p in problems] == [t for t, _b in messages[:4]]
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.close()
