"""Bad config and bad ingest payloads get clear errors and change nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storelink.config import ConfigError, load_config, parse_config_text
from tests.helpers import STORELINK, GatewayProcess, Subscriber, wait_for

GOOD = """
store_id = "store-0042"
[mqtt]
host = "127.0.0.1"
port = 1883
[storage]
path = "/var/lib/storelink/storelink.db"
[http]
listen = "127.0.0.1:8080"
"""


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORELINK, "check-config", str(path)], capture_output=True, text=True, timeout=30)


def test_check_config_accepts_the_documented_minimal_file(tmp_path: Path) -> None:
    p = tmp_path / "good.toml"
    p.write_text(GOOD)
    r = check(p)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (GOOD.replace("port = 1883", "port = 1883\nhots = 'x'"), "mqtt.hots", "unknown key"),
        (GOOD.replace("port = 1883", "port = 99999"), "mqtt.port", "less than or equal"),
        (GOOD.replace('store_id = "store-0042"', ""), "store_id", "required key is missing"),
        (GOOD.replace('listen = "127.0.0.1:8080"', 'listen = "everywhere"'), "http.listen", "HOST:PORT"),
        (GOOD + '\n[mqtt.tls]\ncert = "/c.pem"\n', "mqtt.tls", "together"),
        (GOOD + '\n[[devices]]\nid = "x1"\ndriver = "no_such_driver"\n', "devices[0] (id='x1').driver",
         "unknown driver"),
        (GOOD.replace("[http]", "[http\n"), "not valid TOML", ""),
    ],
)
def test_check_config_names_the_key_and_the_file(tmp_path: Path, text: str, key: str, problem: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    r = check(p)
    assert r.returncode != 0
    assert str(p) in r.stderr and key in r.stderr and problem in r.stderr, r.stderr
    with pytest.raises(ConfigError):
        load_config(p)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = check(tmp_path / "nope.toml")
    assert r.returncode != 0 and "cannot read" in r.stderr


def test_protocol_accepts_number_or_text() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.protocol"):
        parse_config_text(GOOD.replace("port = 1883", "port = 1883\nprotocol = 3.1"))
    assert parse_config_text(GOOD.replace("port = 1883", "port = 1883\nprotocol = 5")).mqtt.protocol == "5"
    assert parse_config_text(GOOD.replace("port = 1883", 'port = 1883\nprotocol = "3.1.1"')).mqtt.protocol == "3.1.1"


def test_ingest_rejects_bad_input_and_accepts_good(gateway_process: GatewayProcess, subscriber: Subscriber) -> None:
    gw = gateway_process.start()
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b'"a string"', 422, "event object"),
        (b'{"kind": "sale"}', 422, "device"),
        (b'{"kind": "Sale Now!", "device": "till-1"}', 422, "kind"),
        (b'{"kind": "sale", "device": "till-1", "data": {}, "extra": 1}', 422, "extra"),
        (b"[]", 422, "1..1000"),
        (b"x" * 300_000, 413, "larger"),
    ]
    for raw, status, text in cases:
        got, body = gw.post("/api/v1/events", None, raw=raw)
        assert got == status, (raw[:40], got, body)
        assert text in str(body), body
    assert gw.get("/api/v1/status")[1]["outbox"]["accepted_total"] == 0  # nothing changed
    status, body = gw.post("/api/v1/events", {"kind": "kiosk.visit", "device": "kiosk-1", "data": {"a": 1}})
    assert status == 202 and body["seq"] == 1 and len(body["id"]) == 32
    status, body = gw.post("/api/v1/events", [{"kind": "sale", "device": "till-1"}] * 3)
    assert status == 202 and [a["seq"] for a in body["accepted"]] == [2, 3, 4]
    wait_for(lambda: len(subscriber.events("store-0042")) == 4, 10, what="4 events")
    st = gw.get("/api/v1/status")[1]
    assert st["store_id"] == "store-0042" and st["version"] and st["uplink"]["connected"]
    assert st["outbox"]["depth"] == 0 or st["outbox"]["depth"] <= 4
    assert gw.get("/healthz")[0] == 200


def test_sigterm_stops_cleanly_and_says_offline(gateway_process: GatewayProcess, subscriber: Subscriber) -> None:
    gw = gateway_process.start()
    wait_for(lambda: any(m.get("state") == "online" for m in subscriber.json("storelink/store-0042/status")), 10,
             what="birth message")
    assert gw.post("/api/v1/events", {"kind": "sale", "device": "till-1"})[0] == 202
    assert gw.terminate() == 0
    wait_for(lambda: subscriber.json("storelink/store-0042/status")[-1]["state"] == "offline", 5, what="offline")
    # The event accepted just before SIGTERM was delivered during the clean stop, not left behind.
    assert len(subscriber.events("store-0042")) == 1
