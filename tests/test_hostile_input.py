"""Issue 10's cases against a real store (broker + `storelink run`), each while good traffic flows: the bad input
gets its documented rejection, the gateway stays healthy, every acknowledged good event reaches head office and
the log shows no customer data, no secret and no traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.hq.batch import build_batch
from storelink.prices.db import WAL_SIZE_LIMIT
from tests.helpers import STORELINK, wait_for
from tests.hostile_helpers import (
    CUSTOMER,
    LIVENESS,
    STORE,
    TILL_SECRET,
    GoodTraffic,
    Store,
    TillLine,
    http_status,
    raw_http,
    sale,
    wait_event,
)

BASE = f"storelink/{STORE}"


def deep(levels: int, leaf: str = "1") -> str:
    return "[" * levels + leaf + "]" * levels


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("hostile")).start()
    yield s
    s.close()


@pytest.fixture
def traffic(store: Store) -> Iterator[GoodTraffic]:
    """Good sales and ingest events throughout a test; afterwards each acknowledged one must reach head office."""
    good = GoodTraffic(store).start()
    wait_for(lambda: len(good.acked) >= 4, LIVENESS, what="good traffic")
    yield good
    good.stop()
    assert not good.failures, good.failures[:5]
    store.assert_delivered(good.acked)
    assert store.healthy()
    store.assert_log_clean()


# -- 1: a lone surrogate ----------------------------------------------------------------------------------------
def test_case1_a_lone_surrogate_is_a_400_and_the_writer_lives(store: Store, traffic: GoodTraffic) -> None:
    for body in (b'{"kind":"sale","device":"d","data":{"v":"\\ud800"}}',
                 b'{"kind":"sale","device":"d","data":{"v":"\xed\xa0\x80"}}',
                 b'{"kind":"sale","device":"d","data":{"\\udfff":1}}'):
        status, reply = store.gw.post("/api/v1/events", None, raw=body)
        assert status == 400, (body, status, reply)
        assert "surrogate" in reply["error"] or "UTF-8" in reply["error"]
    till = TillLine(store.till_port)
    line = json.dumps({"type": "SALE", "id": 7, "sale": sale("s1")}).replace('"17"', '"\\ud800"').encode()
    [reply] = till.replies_to(line)
    assert (reply["type"], reply["code"], reply["re"]) == ("ERROR", "bad_json", None)
    assert till.request({"type": "SALE", "sale": sale(f"ok-{uuid.uuid4().hex}")})["type"] == "OK"
    till.close()
    assert store.status()["outbox"]["alarms"] == {}
    status, accepted = store.gw.post("/api/v1/events", {"kind": "sale", "device": "d", "data": {"v": "ok"}})
    assert status == 202
    traffic.acked.append(accepted["id"])


# -- 2: one unauthenticated message on config/desired -----------------------------------------------------------
def test_case2_a_hostile_config_message_is_rejected_once_and_acknowledged(tmp_path: Path) -> None:
    store = Store(tmp_path).start()
    try:
        good = GoodTraffic(store).start()
        store.publish_and_wait(f"{BASE}/config/desired", b'{"payload":{},"sig":"x","\\ud800":1}')
        rejected = wait_event(store.head_office, "config.rejected")
        assert "surrogate" in rejected["data"]["errors"]["signature"]
        assert store.healthy()
        # Acknowledged: after a restart the broker does not deliver it again (no second rejection, no loop).
        good.stop()
        assert store.gw.terminate() == 0
        store.gw.start()
        store.gw.wait_online(20)
        store.publish_and_wait(f"{BASE}/cmd/ping", b"{}")  # a message after it: the session has been replayed
        time.sleep(1.0)
        assert len(store.head_office.events("config.rejected")) == 1
        assert store.healthy()
        store.assert_delivered(good.acked)
        store.assert_log_clean()
    finally:
        store.close()


# -- 3: NaN and Infinity ----------------------------------------------------------------------------------------
def test_case3_nan_and_infinity_are_bad_input_not_storage_failures(store: Store, traffic: GoodTraffic) -> None:
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        status, reply = store.gw.post("/api/v1/events", None,
                                      raw=f'{{"kind":"sale","device":"d","data":{{"v":{number}}}}}'.encode())
        assert status == 400, (number, status, reply)
    till = TillLine(store.till_port)
    line = json.dumps({"type": "SALE", "id": 8, "sale": sale("s-nan")}).replace('"qty": 1', '"qty": NaN').encode()
    [reply] = till.replies_to(line)
    assert (reply["type"], reply["code"], reply["re"]) == ("ERROR", "bad_json", None)
    assert "NaN" in reply["error"]
    till.close()


# -- 4: deep nesting --------------------------------------------------------------------------------------------
def test_case4_deep_nesting_is_rejected_on_every_surface(store: Store, traffic: GoodTraffic) -> None:
    for levels in (40, 1000, 100_000):
        status, reply = store.gw.post("/api/v1/events", None, raw=f'{{"kind":"sale","device":"d","data":{{"v":'
                                      f"{deep(levels)}}}}}".encode())
        assert status in (400, 413), (levels, status, reply)
    till = TillLine(store.till_port)
    [reply] = till.replies_to(f'{{"type":"SALE","id":9,"sale":{deep(5000)}}}'.encode())
    assert (reply["type"], reply["code"]) == ("ERROR", "bad_json")
    assert till.request({"type": "PING"})["type"] == "OK"  # the connection goes on
    till.close()
    n = len(store.head_office.events("config.rejected"))
    store.publish_and_wait(f"{BASE}/config/desired", f'{{"payload":{deep(1000)},"sig":"x"}}'.encode())
    assert "nested deeper" in wait_event(store.head_office, "config.rejected", n)["data"]["errors"]["signature"]
    n = len(store.head_office.events("price.rejected"))
    store.publish_and_wait(f"{BASE}/prices/batch", f'{{"type":"manifest","envelope":{deep(1000)}}}'.encode())
    e = wait_event(store.head_office, "price.rejected", n)
    assert (e["data"]["reason"], e["data"]["batch_id"]) == ("malformed", None) and "nested" in e["data"]["detail"]


# -- 6: unsigned orphan chunks ----------------------------------------------------------------------------------
def _price_db_bytes(path: Path) -> int:
    """The price database with its WAL: where chunks waiting for a manifest are kept."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith("prices.db"))


def test_case6_orphans_are_bounded_by_bytes(tmp_path: Path) -> None:
    limit = 4 * 1024 * 1024
    store = Store(tmp_path, prices_extra=f"max_parked_bytes = {limit}\n").start()
    try:
        good = GoodTraffic(store, interval=0.05).start()
        before = _price_db_bytes(tmp_path)
        chunk = "A" * 100_000  # base64 text, 100 KB a chunk: 50 chunks x 4 batch ids = 20 MB a round
        for _round in range(3):
            for b in range(4):
                for i in range(50):
                    store.publisher.client.publish(f"{BASE}/prices/batch", json.dumps(
                        {"type": "chunk", "batch_id": f"orphan-{b}", "index": i, "data": chunk}), qos=1)
            store.publish_and_wait(f"{BASE}/cmd/ping", b"{}")  # in order after the round: the round is handled
        wait_for(lambda: store.status()["uplink"]["downlink"]["handled"] >= 603, 60, what="every chunk handled")
        grown = _price_db_bytes(tmp_path) - before
        print(f"price db grew by {grown / 1e6:.1f} MB for 60 MB of orphan chunks (limit {limit / 1e6:.1f} MB)")
        # 60 MB of unsigned chunks were sent; what stays is the allowance plus the WAL's bounded size.
        assert grown < limit + WAL_SIZE_LIMIT + 1024 * 1024, f"the price database grew by {grown} bytes"
        # A single chunk over the whole allowance is refused at once, and says why.
        n = len(store.head_office.events("price.rejected"))
        store.publish_and_wait(f"{BASE}/prices/batch", json.dumps(
            {"type": "chunk", "batch_id": "huge", "index": 0, "data": "A" * (limit + 1)}).encode())
        e = wait_event(store.head_office, "price.rejected", n)
        assert (e["data"]["reason"], e["data"]["batch_id"]) == ("too_large", "huge")
        # A signed batch still goes through afterwards.
        b = build_batch([{"sku": "1001", "price": 449}], version=7, batch_id="real-7", store=STORE,
                        key=store.key.private_b64)
        for m in b.messages:
            store.publisher.publish(f"{BASE}/prices/batch", m)
        wait_event(store.head_office, "price.committed", match=lambda ev: ev["data"]["version"] == 7)
        good.stop()
        assert not good.failures, good.failures[:5]
        store.assert_delivered(good.acked)
        store.assert_log_clean()
    finally:
        store.close()


# -- 8: malformed requests, surrogate ids, slow requests --------------------------------------------------------
MALFORMED = [
    b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Customer: " + CUSTOMER.encode() + b"\x01\r\n\r\n",
    b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Customer\x7f: " + CUSTOMER.encode() + b"\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nX-Customer: " + CUSTOMER.encode() + b"\r\n\r\n",
    b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: " + CUSTOMER.encode() + b"\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nX-Customer: " + CUSTOMER.encode() + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + CUSTOMER.encode() * 2000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: " + CUSTOMER.encode()
    + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + CUSTOMER.encode(),  # a TLS ClientHello on the HTTP port
    b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nExpect: " + CUSTOMER.encode() + b"\xff\r\nContent-Length: 2\r\n\r\n{}",
]


def test_case8_malformed_requests_get_400_and_leave_no_bytes_in_the_log(store: Store, traffic: GoodTraffic) -> None:
    for data in MALFORMED:
        status = http_status(raw_http(store.http_port, data))
        assert 400 <= status < 500 or status == 0, (data[:60], status)
    # An undecodable Authorization header is a 401, not a 500.
    reply = raw_http(store.http_port, b"POST /api/v1/actions/resync-prices HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     b"Bearer \xff\xfe" + CUSTOMER.encode() + b"\r\nContent-Length: 0\r\n\r\n")
    assert http_status(reply) == 401, reply[:200]
    # The answers for a path or a method nobody serves stay 404 and 405.
    assert http_status(raw_http(store.http_port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")) == 404
    assert http_status(raw_http(store.http_port, b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    wait_for(lambda: "malformed request refused" in store.log_text(), LIVENESS,
             what="the one-line log of a bad request")


def test_case8_surrogate_ids_still_get_their_rejection_and_reply(store: Store, traffic: GoodTraffic) -> None:
    n = len(store.head_office.events("price.rejected"))
    store.publish_and_wait(f"{BASE}/prices/batch", b'{"type":"chunk","batch_id":"\\ud800","index":0,"data":""}')
    e = wait_event(store.head_office, "price.rejected", n)
    assert (e["data"]["reason"], e["data"]["batch_id"]) == ("malformed", None) and "surrogate" in e["data"]["detail"]
    corr = uuid.uuid4().bytes
    store.publish_and_wait(f"{BASE}/cmd/ping", b'{"correlation_id":"\\ud800"}', response_topic="fuzz/replies/8",
                           correlation=corr)
    wait_for(lambda: any(c == corr for _t, _b, c in store.head_office.replies("fuzz/replies/8")), LIVENESS,
             what="a reply to the command with a surrogate correlation_id")
    [(_t, body, _c)] = [r for r in store.head_office.replies("fuzz/replies/8") if r[2] == corr]
    assert (body["ok"], body["code"]) == (False, "bad_request")
    # MQTT 3.1.1 style (no response topic): the reply goes to cmd-reply/{name}.
    before = len(store.head_office.replies(f"{BASE}/cmd-reply/ping"))
    store.publish_and_wait(f"{BASE}/cmd/ping", b'{"correlation_id":"\\udfff","reply_to":"x"}')
    wait_for(lambda: len(store.head_office.replies(f"{BASE}/cmd-reply/ping")) > before, LIVENESS, what="cmd-reply")
    # A reply topic that is not a valid topic name, or one of the store's own uplink topics, is not used.
    for reply_to in (f"{BASE}/events/sale", "bad/+/topic", "nul\u0000topic"):
        before = len(store.head_office.replies(f"{BASE}/cmd-reply/ping"))
        store.publish_and_wait(f"{BASE}/cmd/ping", json.dumps({"reply_to": reply_to}).encode())
        wait_for(lambda: len(store.head_office.replies(f"{BASE}/cmd-reply/ping")) > before, LIVENESS,  # noqa: B023
                 what=f"the reply to {reply_to!r} on cmd-reply")
    assert not [e for e in store.head_office.events("sale") if "command" in e]
    assert store.status()["uplink"]["connected"]


def test_case8_slow_half_sent_requests_time_out_and_cannot_take_every_slot(store: Store,
                                                                           traffic: GoodTraffic) -> None:
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(180):  # from another address on the loopback network: an attacker on the store LAN
        s = socket.create_connection(("127.0.0.1", store.http_port), timeout=10, source_address=("127.0.0.2", 0))
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    started = time.monotonic()
    status, _ = store.gw.post("/api/v1/events", {"kind": "sale", "device": "d", "data": {}})
    assert status == 202, "a host with 180 half-sent requests locked out everyone else"
    closed_after: list[float] = []
    for s in socks:
        s.settimeout(max(0.1, 10 - (time.monotonic() - started)))
        try:
            data = s.recv(4096)
            while data and b"503" not in data[:20]:
                data = s.recv(4096)
            if data:
                refused += 1
            else:
                closed_after.append(time.monotonic() - started)
        except (TimeoutError, ConnectionResetError):
            pytest.fail("a half-sent request was kept open past the request timeout")
        finally:
            s.close()
    # 32 connections (the per-address limit) were served and timed out after request_timeout (3 s); the rest got
    # a 503 at once.
    assert refused >= 180 - 32, refused
    assert closed_after and max(closed_after) < 3 + 2.5, closed_after


# -- 9: the till port's defaults --------------------------------------------------------------------------------
def test_case9_an_open_till_port_needs_a_secret_or_an_allow_list(tmp_path: Path) -> None:
    def check(device: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.toml"
        path.write_text(f'store_id = "s"\n[[devices]]\nid = "till-1"\ndriver = "till_tcp"\n{device}')
        return subprocess.run([STORELINK, "check-config", str(path)], capture_output=True, text=True, timeout=60)

    res = check('listen = "0.0.0.0:7700"\n')
    assert res.returncode == 1 and "set `secret`" in res.stderr and "devices[0] (id='till-1')" in res.stderr
    assert check('listen = ":7700"\n').returncode == 1
    assert check("").returncode == 0  # the default listens on loopback only
    assert check(f'listen = "0.0.0.0:7700"\nsecret = "{TILL_SECRET}"\n').returncode == 0
    assert check('listen = "0.0.0.0:7700"\nallow = ["10.0.4.0/24"]\n').returncode == 0
    assert check('listen = "0.0.0.0:7700"\nallow = ["10.0.4.0/33"]\n').returncode == 1


def test_case9_unknown_tills_are_refused(store: Store, traffic: GoodTraffic) -> None:
    wrong = TillLine(store.till_port, hello=False)
    assert wrong.request({"type": "HELLO", "till_id": "1", "secret": "not-" + TILL_SECRET})["code"] == "unauthorized"
    nobody = TillLine(store.till_port, hello=False)
    assert nobody.request({"type": "HELLO", "till_id": "99", "secret": TILL_SECRET})["code"] == "unknown_till"
    for t in (wrong, nobody):
        t.close()
    assert f"not-{TILL_SECRET}" not in store.log_text()


def test_case9_the_allow_list_refuses_other_addresses_before_hello(tmp_path: Path) -> None:
    store = Store(tmp_path, till_extra='allow = ["127.0.0.1/32"]\n').start()
    try:
        intruder = TillLine(store.till_port, source="127.0.0.2", hello=False)
        reply = intruder.read()  # refused before it said anything
        assert (reply["type"], reply["code"]) == ("ERROR", "unauthorized")
        intruder.close()
        till = TillLine(store.till_port)  # from the allowed address, with the secret
        assert till.request({"type": "SALE", "sale": sale("allowed-1")})["type"] == "OK"
        till.close()
        store.assert_log_clean()
    finally:
        store.close()
