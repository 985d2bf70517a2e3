"""Price batches into a real `storelink run` over a real broker: accepted, reassembled, and every rejection."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.prices_helpers import (
    STORE,
    Publisher,
    batch,
    items,
    latest_state,
    make_key,
    prices_config,
    wait_event,
)


@pytest.fixture
def hq_key():  # type: ignore[no-untyped-def]
    return make_key()


@pytest.fixture
def gateway(tmp_path: Path, mosquitto: Mosquitto, hq_key) -> GatewayProcess:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, port, prices_config(hq_key))
    text = cfg.read_text().replace(f'store_id = "{STORE}"\n', f'store_id = "{STORE}"\ngroups = ["north"]\n')
    cfg.write_text(text)
    proc = GatewayProcess(cfg, port).start()
    yield proc  # type: ignore[misc]
    proc.stop()


def _price(gw: GatewayProcess, code: str) -> int | None:
    status, body = gw.get(f"/api/v1/prices/{code}")
    return body["price"] if status == 200 else None


def test_signed_batch_is_reassembled_and_committed(gateway: GatewayProcess, mosquitto: Mosquitto,
                                                   subscriber: Subscriber, hq_key) -> None:  # type: ignore[no-untyped-def]
    hq = Publisher(mosquitto.port)
    b = batch(hq_key, 1, items(12_000, base=100, step=1), chunk_items=1000)
    # chunks first, manifest last: chunks wait (unverified) for their manifest
    hq.send(f"storelink/{STORE}/prices/batch", b.messages[1:] + b.messages[:1])
    wait_event(subscriber, "price.committed", version=1)
    assert _price(gateway, "SKU000007") == 107
    assert _price(gateway, "4000000000007") == 107  # by GTIN too
    assert _price(gateway, "NOPE") is None
    wait_for(lambda: (latest_state(subscriber) or {}).get("active_version") == 1, 10, what="retained state v1")
    assert latest_state(subscriber)["items"] == 12_000  # type: ignore[index]

    # a delta batch changes one price and leaves the rest
    hq.batch(batch(hq_key, 2, [{"sku": "SKU000007", "price": 99, "description": "Item 7"}], mode="delta"))
    wait_event(subscriber, "price.committed", version=2)
    assert _price(gateway, "SKU000007") == 99
    assert _price(gateway, "SKU000008") == 108
    hq.close()


def test_group_batch_applies_to_member_stores(gateway: GatewayProcess, mosquitto: Mosquitto,
                                              subscriber: Subscriber, hq_key) -> None:  # type: ignore[no-untyped-def]
    hq = Publisher(mosquitto.port)
    b = batch(hq_key, 5, items(10), store=None, group="north")  # type: ignore[arg-type]
    hq.send("storelink/groups/north/prices/batch", b.messages)
    wait_event(subscriber, "price.committed", version=5)
    other = batch(hq_key, 6, items(10, base=1), store=None, group="south")  # type: ignore[arg-type]
    hq.send("storelink/groups/north/prices/batch", other.messages)  # signed for south, sent on north
    wait_event(subscriber, "price.rejected", reason="wrong_target", batch_id="b6")
    assert _price(gateway, "SKU000001") == 100
    hq.close()


def _tamper_chunk(message: bytes) -> bytes:
    msg = json.loads(message)
    data = json.loads(zlib.decompress(base64.b64decode(msg["data"])))
    data[0]["price"] = 1
    msg["data"] = base64.b64encode(zlib.compress(json.dumps(data).encode())).decode()
    return json.dumps(msg).encode()


def test_every_rejection_leaves_prices_untouched_and_is_reported(
        gateway: GatewayProcess, mosquitto: Mosquitto, subscriber: Subscriber, hq_key) -> None:  # type: ignore[no-untyped-def]
    hq = Publisher(mosquitto.port)
    good = batch(hq_key, 1, items(50, base=500))
    hq.batch(good)
    wait_event(subscriber, "price.committed", version=1)
    topic = f"storelink/{STORE}/prices/batch"
    cheaper = items(50, base=1)

    hq.batch(batch(None, 2, cheaper, batch_id="unsigned"))
    wait_event(subscriber, "price.rejected", reason="unsigned", batch_id="unsigned")

    hq.batch(batch(make_key(), 2, cheaper, batch_id="forged"))
    e = wait_event(subscriber, "price.rejected", reason="bad_signature", batch_id="forged")
    assert "unknown key_id" in e["data"]["detail"]

    tampered = batch(hq_key, 2, cheaper, batch_id="tampered")
    hq.send(topic, [tampered.messages[0], _tamper_chunk(tampered.messages[1])])
    e = wait_event(subscriber, "price.rejected", reason="bad_signature", batch_id="tampered")
    assert "SHA-256" in e["data"]["detail"]

    hq.send(topic, [b"{not json", b'{"type": "chunk", "batch_id": "x"}', b'{"type": "invoice"}'])
    wait_for(lambda: sum(1 for ev in subscriber.events(STORE) if ev["kind"] == "price.rejected"
                         and ev["data"]["reason"] == "malformed") >= 3, 15, what="three malformed rejections")
    bad_item = batch(hq_key, 2, [{"sku": "A1", "price": -5}], batch_id="negative")
    hq.batch(bad_item)
    e = wait_event(subscriber, "price.rejected", reason="malformed", batch_id="negative")
    assert "price" in e["data"]["detail"]

    hq.batch(batch(hq_key, 1, cheaper, batch_id="same-version"))
    wait_event(subscriber, "price.rejected", reason="stale", batch_id="same-version")

    hq.batch(good)  # the very batch that was applied, sent again
    wait_event(subscriber, "price.rejected", reason="replayed", batch_id="b1")

    hq.batch(batch(hq_key, 3, cheaper, batch_id="elsewhere", store="store-0099"))
    wait_event(subscriber, "price.rejected", reason="wrong_target", batch_id="elsewhere")

    assert all(_price(gateway, f"SKU{i:06d}") == 500 for i in range(0, 50, 7))
    status, state = gateway.get("/api/v1/prices/state")
    assert status == 200 and state["active_version"] == 1 and state["pending"] is None
    assert not [ev for ev in subscriber.events(STORE) if ev["kind"] in ("price.committed",)
                and ev["data"]["version"] != 1]

    # the store still takes the next good batch
    hq.batch(batch(hq_key, 4, items(50, base=700)))
    wait_event(subscriber, "price.committed", version=4)
    assert _price(gateway, "SKU000000") == 700
    hq.close()


def test_behind_desired_asks_for_a_resend(gateway: GatewayProcess, mosquitto: Mosquitto,
                                          subscriber: Subscriber, hq_key) -> None:  # type: ignore[no-untyped-def]
    hq = Publisher(mosquitto.port)
    hq.send(f"storelink/{STORE}/prices/desired", [json.dumps({"version": 9, "batch_id": "b9"}).encode()],
            retain=True)
    e = wait_event(subscriber, "price.resend_requested", desired_version=9)
    assert e["data"]["active_version"] == 0
    hq.send(f"storelink/{STORE}/prices/desired", [b"[1, 2]"], retain=True)
    wait_event(subscriber, "price.rejected", reason="malformed", source="desired")
    hq.close()
