"""The ingest's MQTT connection: a paho client with manual acknowledgement and a persistent session.

The session must survive the worker (a kill -9 leaves the unacknowledged messages in it, and messages keep
queueing for it while it is away), so the client id is fixed per worker (``storelink-ingest-{worker}``), MQTT 5
``clean_start`` is false with a session expiry, and 3.1.1 uses ``clean_session = false``. MQTT 5's Receive
Maximum tells the broker how many unacknowledged messages it may send us: it bounds a batch (Mosquitto sends
only 20 to a client that does not say, and that is also its limit for 3.1.1 clients: `max_inflight_messages`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)


class LinkError(Exception):
    """The broker cannot be used (unreachable, refused us or a subscription); one line saying why."""


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keepalive: int = 30

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LinkError(f"--broker: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def ingest_client(opts: BrokerOptions, client_id: str, filters: list[str], *, receive_maximum: int,
                  session_expiry: int, on_link_change: Any, on_message: Any, timeout: float = 15.0) -> mqtt.Client:
    """Connected, subscribed (every filter granted) and looping; raises LinkError otherwise.

    `on_link_change()` is called on every connect and disconnect (from paho's thread) before any message of the
    new connection is handed over. Subscriptions are renewed on every connect."""
    v5 = opts.protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else False,
                         manual_ack=True)
    if opts.username:
        client.username_pw_set(opts.username, opts.password)
    if opts.ca or opts.cert:
        client.tls_set(ca_certs=str(opts.ca) if opts.ca else None, certfile=str(opts.cert) if opts.cert else None,
                       keyfile=str(opts.key) if opts.key else None, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(1, 30)
    ready = threading.Event()
    problem: list[str] = []

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        on_link_change()
        if reason.is_failure:
            problem.append(f"broker {opts.where} refused the connection: {reason}")
            ready.set()
            return
        c.subscribe([(f, 1) for f in filters])

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        refused = [f"{f} ({r})" for f, r in zip(filters, codes, strict=False) if r.is_failure]
        if refused:
            problem.append(f"broker {opts.where} refused the subscription to {', '.join(refused)}")
            log.error(problem[-1])
        else:
            log.info("subscribed on %s: %s", opts.where, ", ".join(filters))
        ready.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        on_link_change()
        if ready.is_set() and reason.is_failure:  # not our own disconnect() at shutdown
            log.warning("broker %s: disconnected (%s); reconnecting", opts.where, reason)

    client.on_connect = on_connect
    client.on_message = on_message  # before connecting: the session's messages come right after CONNACK
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    props = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        props.ReceiveMaximum = receive_maximum
    try:
        client.connect(opts.host, opts.port, opts.keepalive,
                       clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
    except (OSError, ValueError) as err:
        raise LinkError(f"cannot reach broker {opts.where}: {getattr(err, 'strerror', None) or err}") from None
    client.loop_start()
    if not ready.wait(timeout) or problem:
        client.disconnect()
        client.loop_stop()
        raise LinkError(problem[0] if problem else f"broker {opts.where} did not answer within {timeout:g} s")
    return client
