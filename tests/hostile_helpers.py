"""A whole store for hostile-input tests and the fuzzing suite: a real Mosquitto, a real `storelink run` with an
ingest API, a till port, a serial scanner on a real pty, signed prices, remote config and commands, plus the
clients an attacker or a broken device would use (raw HTTP, raw till lines, raw MQTT publishes, raw serial bytes)
and the good traffic that must go on flowing meanwhile.

Canaries: ``CUSTOMER`` stands for customer data and ``*_SECRET`` for secrets. Tests put them into what they send
(good events, bad requests, headers, sales, wrong secrets) and check that the gateway's log never shows them.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from storelink.remote.signing import KeyPair, keygen
from tests import contract_check
from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for, write_config
from tests.input_helpers import PtyScanner
from tests.prices_helpers import Publisher

STORE = "store-0042"
CUSTOMER = "Jane Canary-Doe"  # never an identifier (it has a space), so no log line may ever quote it
HTTP_SECRET = "http-token-SECRETCANARY-0001"
TILL_SECRET = "till-secret-SECRETCANARY-0002"
MQTT_SECRET = "mqtt-pass-SECRETCANARY-0003"
CANARIES = ("Canary", "CANARY")
# How long to wait for what takes milliseconds on an idle machine (a reply, an event at head office): generous,
# because CI shares two cores with other jobs; a real hang still fails, only later.
LIVENESS = 30.0
TILL_ID = "2"  # the till the tests send garbage as; till "1" carries the good traffic


class HeadOfficeView:
    """Everything the store sends that head office sees: events, command replies, the config report."""

    def __init__(self, port: int, store: str = STORE):
        base = f"storelink/{store}"
        self.filters = [f"{base}/events/#", f"{base}/cmd-reply/#", f"{base}/config/reported", "fuzz/replies/#"]
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any], bytes | None]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ho-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_a: c.subscribe([(f, 1) for f in self.filters])
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10), "head office did not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("fuzz/replies"):
            contract_check.check_reply(msg.topic, bytes(msg.payload))
        else:
            contract_check.check(msg.topic, bytes(msg.payload))  # what the gateway publishes matches the contract
        body = json.loads(msg.payload) if msg.payload else {}  # the gateway only ever publishes JSON
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        with self.lock:
            self.messages.append((msg.topic, body, corr))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [b for t, b, _c in self.messages if "/events/" in t and (kind is None or b.get("kind") == kind)]

    def replies(self, topic_prefix: str = "") -> list[tuple[str, dict[str, Any], bytes | None]]:
        with self.lock:
            return [m for m in self.messages if ("/cmd-reply/" in m[0] or m[0].startswith("fuzz/replies"))
                    and m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class TillLine:
    """A raw till connection: one line out, the replies back (blocking sockets, for Hypothesis tests). It answers
    the gateway's own requests (PREPARE, COMMIT, ABORT, VERSION, PING) like a simple till, so price changes go on
    while it is used to send garbage."""

    def __init__(self, port: int, source: str = "127.0.0.1", hello: bool = True, secret: str = TILL_SECRET,
                 till_id: str = TILL_ID):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS, source_address=(source, 0))
        self.buf = b""
        self.ids = 0
        self.version: int | None = None
        if hello:
            reply = self.request({"type": "HELLO", "till_id": till_id, "protocol": 1, "secret": secret})
            assert reply["type"] == "OK", reply

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        """The next reply (OK or ERROR); the gateway's requests in between are answered on the way."""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the gateway closed the till connection")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("type") in ("OK", "ERROR"):
                return msg
            self._answer(msg)

    def _answer(self, msg: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"type": "OK", "re": msg.get("id")}
        if msg.get("type") == "COMMIT":
            self.version = reply["version"] = msg.get("version")
        elif msg.get("type") == "VERSION":
            reply.update(version=self.version, staged=None)
        self.send(json.dumps(reply).encode() + b"\n")

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        self.send(json.dumps({**message, "id": f"t{self.ids}"}).encode() + b"\n")
        return self.read()

    def replies_to(self, line: bytes) -> list[dict[str, Any]]:
        """Send one raw line, then a PING; the replies that came before the PING's OK (0 or 1 of them)."""
        self.ids += 1
        marker = f"ping{self.ids}"
        self.send(line + b"\n" + json.dumps({"type": "PING", "id": marker}).encode() + b"\n")
        out = []
        while True:
            reply = self.read()
            if reply.get("re") == marker and reply.get("type") == "OK":
                return out
            out.append(reply)

    def close(self) -> None:
        self.sock.close()


def raw_http(port: int, data: bytes, timeout: float = 10, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the HTTP port and return whatever comes back until the server closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def http_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


class GoodTraffic:
    """A cashier and an ingest client that keep working while the store is attacked: records every event the
    gateway acknowledged (202, or a till's OK) so a test can check that each of them reached head office."""

    def __init__(self, store: Store, interval: float = 0.02):
        self.store = store
        self.interval = interval
        self.acked: list[str] = []  # event ids
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)

    def start(self) -> GoodTraffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        till = TillLine(self.store.till_port, till_id="1")
        try:
            while not self._stop.is_set():
                n += 1
                status, body = self.store.gw.post("/api/v1/events", {
                    "kind": "pickup.collected", "device": "locker-1",
                    "data": {"n": n, "customer": CUSTOMER, "note": "größe ✓"}})
                if status == 202:
                    self.acked.append(body["id"])
                else:
                    self.failures.append(f"ingest {status}: {body}")
                reply = till.request({"type": "SALE", "sale": sale(f"good-{uuid.uuid4().hex[:12]}")})
                if reply.get("type") == "OK":
                    self.acked.append(reply["event_id"])
                else:
                    self.failures.append(f"till: {reply}")
                self._stop.wait(self.interval)
        except Exception as err:  # recorded; the test fails on it
            self.failures.append(f"good traffic stopped: {type(err).__name__}: {err}")
        finally:
            till.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def sale(sale_id: str, **extra: Any) -> dict[str, Any]:
    return {"sale_id": sale_id, "currency": "EUR", "total": 499,
            "lines": [{"sku": "1001", "qty": 1, "price": 499, "description": "Äpfel"}],
            "payments": [{"tender": "card", "amount": 499}], "extra": {"cashier": "17", "loyalty": CUSTOMER, **extra}}


class Store:
    """Broker + gateway + clients, under ``workdir``. ``extra`` is appended to the gateway's config."""

    def __init__(self, workdir: Path, extra: str = "", http_extra: str = "", prices_extra: str = "",
                 till_extra: str = ""):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(workdir).start()
        self.key: KeyPair = keygen()
        self.http_port, self.till_port = free_port(), free_port()
        self.scanner = PtyScanner(workdir / "scanner0")
        tills = "".join(f'[[devices]]\nid = "till-{t}"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{self.till_port}"\n'
                        f'till_id = "{t}"\nsecret = "{TILL_SECRET}"\nping_interval = 3600\n{till_extra}'
                        for t in "12")
        self.config = write_config(
            workdir / "storelink.toml", STORE, self.broker.port, self.http_port,
            f'token = "{HTTP_SECRET}"\nrequest_timeout = 3\n{http_extra}'
            f'[trust]\npublic_keys = ["{self.key.public_b64}"]\n'
            "[prices]\ncommit_retry = 0.3\nconfirm_poll = 0.3\nstale_check = 0.5\naudit_interval = 3600\n"
            f"{prices_extra}[remote]\nrollback_after = 3\n[cart]\nenabled = true\n{tills}"
            f'[[devices]]\nid = "scanner0"\ndriver = "serial_scanner"\nport = "{self.scanner.link}"\n'
            f"baudrate = 115200\nterminator = \"CR\"\nframe_timeout = 0\n" + extra)
        # Broker credentials (mosquitto with allow_anonymous ignores them): a secret the log must never show.
        text = self.config.read_text()
        text = text.replace("[mqtt]\n", f'groups = ["north"]\n[mqtt]\nusername = "store"\n'
                                         f'password = "{MQTT_SECRET}"\n', 1)
        self.config.write_text(text)
        self.gw = GatewayProcess(self.config, self.http_port)
        self.head_office = HeadOfficeView(self.broker.port)
        self.publisher = Publisher(self.broker.port)

    def start(self) -> Store:
        self.gw.start()
        self.gw.wait_online(20)
        wait_for(lambda: self.device("till-2")["details"].get("till_id") == TILL_ID, 10, what="the till port")
        wait_for(lambda: self.device("scanner0")["state"] == "ok", 20, what="the scanner")
        return self

    def status(self) -> dict[str, Any]:
        return self.gw.get("/api/v1/status")[1]  # type: ignore[no-any-return]

    def device(self, device_id: str) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["device"] == device_id)

    def healthy(self) -> bool:
        return self.gw.get("/healthz")[0] == 200

    def downlink_handled(self) -> int:
        return int(self.status()["uplink"]["downlink"]["handled"])

    def publish_and_wait(self, topic: str, payload: bytes, **kw: Any) -> None:
        """Publish QoS 1 and wait until the gateway has handled (and so acknowledged) the message."""
        before = self.downlink_handled()
        self.publisher.publish(topic, payload, **kw)
        wait_for(lambda: self.downlink_handled() > before, LIVENESS, what=f"the gateway to handle a message on {topic}")

    def log_text(self) -> str:
        return self.gw.log.read_text(errors="replace")

    def assert_log_clean(self) -> None:
        """Nothing customer-related or secret, and no traceback, in everything the gateway logged."""
        text = self.log_text()
        leaks = [line for line in text.splitlines() if any(c in line for c in CANARIES)]
        assert not leaks, "the log shows customer data or secrets:\n" + "\n".join(leaks[:10])
        assert "Traceback" not in text, text[text.index("Traceback") - 500:][:3000]

    def assert_delivered(self, event_ids: list[str], timeout: float = 4 * LIVENESS) -> None:
        wanted = set(event_ids)

        def missing() -> set[str]:
            return wanted - {e["id"] for e in self.head_office.events()}

        wait_for(lambda: not missing(), timeout, what=f"{len(wanted)} acknowledged events at head office")

    def close(self) -> None:
        self.gw.stop()
        for c in (self.head_office, self.publisher):
            c.close()
        self.scanner.unplug()
        self.broker.stop()


def wait_event(view: HeadOfficeView, kind: str, after: int = 0, timeout: float = LIVENESS,
               match: Callable[[dict[str, Any]], bool] = lambda _e: True) -> dict[str, Any]:
    """The first event of ``kind`` beyond the first ``after`` of them that satisfies ``match``."""
    def found() -> dict[str, Any] | None:
        return next((e for e in view.events(kind)[after:] if match(e)), None)

    return wait_for(found, timeout, what=f"a {kind} event")  # type: ignore[no-any-return]
