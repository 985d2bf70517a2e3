"""Head office's MQTT connection: `connect(cfg, role)` returns a connected paho client or raises `HqLinkError`.

Every `storelink hq` command and the long-running head-office services use it, so they all speak the configured
protocol (5 or 3.1.1), use the same TLS identity and say in one line why a connection failed (the reasons are
shared with the store's uplink: storelink.mqtt_problems). `HqClient` is a paho ``Client`` with two additions:
``publish_confirmed()`` (raises when the broker refuses a message or the link drops before its PUBACK) and
``subscribe_confirmed()`` (waits for the SUBACK, raises on a refused filter, and subscribes again after a
reconnect). Set ``on_message`` as usual; ``on_connect``, ``on_disconnect``, ``on_publish`` and ``on_subscribe``
belong to this class.

A service that must not lose a message across its own crash (`storelink hq ingest`) connects with a
`PersistentSession`: a fixed client id, manual acknowledgement and a session the broker keeps (MQTT 5 clean start
false with a session expiry, 3.1.1 clean session false), so whatever it had not acknowledged comes again.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from storelink.hq.config import HqConfig, HqConfigError
from storelink.mqtt_problems import (
    Endpoint,
    LinkProblem,
    SocketErrorTrap,
    problem_closed_before_connack,
    problem_from_connack,
    problem_from_disconnect,
    problem_from_exception,
)


class HqLinkError(Exception):
    """The broker cannot be used: unreachable, refused us, refused a message, or the link dropped."""

    def __init__(self, problem: LinkProblem | str):
        self.problem = problem if isinstance(problem, LinkProblem) else LinkProblem("link", problem)
        super().__init__(self.problem.message)


def tls_context(cfg: HqConfig) -> ssl.SSLContext | None:
    tls = cfg.broker.tls
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    except (OSError, ssl.SSLError) as err:
        raise HqConfigError(f"{cfg.source}: broker.tls.ca (--tls-ca): cannot load {tls.ca}: "
                            f"{getattr(err, 'strerror', None) or err}") from None
    if tls.cert is not None and tls.key is not None:
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        except (OSError, ssl.SSLError) as err:
            raise HqConfigError(f"{cfg.source}: broker.tls.cert/key (--tls-cert/--tls-key): cannot load "
                                f"{tls.cert} with {tls.key}: "
                                f"{getattr(err, 'strerror', None) or err}") from None
    return ctx


@dataclass(frozen=True)
class PersistentSession:
    """A session the broker keeps for this client id while the client is away, with manual acknowledgement: the
    caller acknowledges each message (``client.ack(mid, qos)``) once it is safe, the rest comes again."""

    client_id: str
    expiry: int  # seconds the broker keeps the session (and queues for it) after a disconnect (MQTT 5)
    receive_maximum: int  # MQTT 5: unacknowledged messages the broker may send at once


class HqClient(mqtt.Client):
    def __init__(self, cfg: HqConfig, role: str, session: PersistentSession | None = None):
        self.cfg = cfg
        self.session = session
        b = cfg.broker
        v5 = b.protocol == "5"
        client_id = session.client_id if session else f"storelink-hq-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=None if v5 or session is None else False, manual_ack=session is not None)
        # Called from paho's thread on every connect (None) and disconnect (why), before any message of the new
        # connection is handed to on_message: a mid means nothing on another connection.
        self.on_link_change: Callable[[LinkProblem | None], None] | None = None
        self.endpoint = Endpoint(b.host, b.port, "broker", b.tls is not None, b.tls.ca if b.tls else None,
                                 b.tls.cert if b.tls else None, b.connect_timeout, b.protocol, "broker.address")
        self._trap = SocketErrorTrap()
        self.enable_logger(self._trap.logger)
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._lost: LinkProblem | None = None  # why the link is down (None while connected)
        self._acks: dict[int, ReasonCode] = {}  # mid -> the broker's PUBACK
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._filters: list[tuple[str, int]] = []  # subscribed again after a reconnect
        self.on_connect = self._connected
        self.on_disconnect = self._disconnected
        self.on_publish = self._published
        self.on_subscribe = self._subscribed

    # -- connecting -----------------------------------------------------------------------------------------
    def open(self) -> None:
        b = self.cfg.broker
        ctx = tls_context(self.cfg)
        if ctx is not None:
            self.tls_set_context(ctx)
        if b.username:
            self.username_pw_set(b.username, self.cfg.broker_password())
        self.connect_timeout = b.connect_timeout
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        props = None
        if self.session is not None and b.protocol == "5":
            clean_start = False
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session.expiry
            props.ReceiveMaximum = self.session.receive_maximum
        try:
            self.connect(b.host, b.port, b.keepalive, clean_start=clean_start, properties=props)
        except OSError as err:  # DNS, TCP, the TLS handshake (ssl errors are OSErrors)
            raise HqLinkError(problem_from_exception(err, self.endpoint)) from None
        # Until the CONNACK, paho's loop runs here: its own thread would sleep out a reconnect delay before a
        # failed attempt could be stopped.
        deadline = time.monotonic() + b.connect_timeout
        while self._connack is None and self._lost is None and time.monotonic() < deadline:
            try:
                rc = self.loop(0.1)
            except OSError as err:  # paho reconnects by itself once (MQTT 3.1.1 -> 3.1) and that can fail
                self.disconnect()
                raise HqLinkError(problem_from_exception(err, self.endpoint)) from None
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                break
        connack, lost = self._connack, self._lost
        if connack is not None and not connack.is_failure:
            self.loop_start()
            return
        self.disconnect()
        if connack is not None:
            raise HqLinkError(problem_from_connack(connack, self.endpoint))
        if lost is not None:
            raise HqLinkError(lost)
        if self._trap.last is not None:  # the loop ended without paho calling on_disconnect
            raise HqLinkError(problem_closed_before_connack(self.endpoint, self._trap.take()))
        raise HqLinkError(LinkProblem("no_connack", f"{self.endpoint.where} accepted the connection but sent no "
                                                    f"MQTT CONNACK within {b.connect_timeout:g} s (is it an MQTT "
                                                    "broker?)"))

    def _connected(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if self.on_link_change is not None and not reason.is_failure:
            self.on_link_change(None)
        with self._cond:
            self._connack = reason
            if not reason.is_failure:
                self._lost = None
            self._cond.notify_all()
        if not reason.is_failure and self._filters:  # a reconnect: the broker may have dropped the session
            self.subscribe(self._filters)

    def _disconnected(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            was_up = self._connack is not None and not self._connack.is_failure  # not a first attempt's failure
            if self._connack is None:
                self._lost = problem_closed_before_connack(self.endpoint, self._trap.take())
            else:
                self._lost = problem_from_disconnect(reason, self._trap.take())
            lost = self._lost
            self._cond.notify_all()
        if self.on_link_change is not None and was_up:  # open() raises the first attempt's failure instead
            self.on_link_change(lost)

    # -- publishing -----------------------------------------------------------------------------------------
    # paho may answer before publish()/subscribe() has returned the mid, and our lock must never be held around
    # those calls (paho's thread holds its own locks while it calls back: FIELD-NOTES). So every answer is kept
    # (the oldest dropped past a bound) and the caller picks up its own.
    def _keep(self, answers: dict[int, Any], mid: int, value: Any) -> None:
        with self._cond:
            answers[mid] = value
            if len(answers) > 100_000:
                del answers[next(iter(answers))]
            self._cond.notify_all()

    def _published(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._keep(self._acks, mid, reason)

    def publish_confirmed(self, topic: str, payloads: Iterable[bytes | str], *, qos: int = 1, retain: bool = False,
                          properties: Properties | None = None, timeout: float = 60.0) -> None:
        """Publish each payload and wait until the broker has acknowledged all of them (QoS 1)."""
        mids: list[int] = []
        for payload in payloads:
            info = self.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise HqLinkError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
            mids.append(info.mid)
        if qos == 0:
            return
        deadline = time.monotonic() + timeout
        try:
            with self._cond:
                while True:
                    answers = [self._acks[m] for m in mids if m in self._acks]
                    refused = [r for r in answers if r.is_failure]
                    if refused:
                        raise HqLinkError(LinkProblem("publish_refused", f"the broker refused to take the message "
                                                                         f"on {topic}: {refused[0]} (its ACL does "
                                                                         "not let head office write there?)"))
                    if len(answers) == len(mids):
                        return
                    if self._lost is not None:
                        raise HqLinkError(LinkProblem(self._lost.code, f"{self._lost.message} (while publishing to "
                                                                       f"{topic}; not every message arrived)"))
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HqLinkError(LinkProblem("timeout", f"the broker did not acknowledge the messages on "
                                                                 f"{topic} within {timeout:g} s"))
                    self._cond.wait(min(left, 0.5))
        finally:
            with self._cond:
                for m in mids:
                    self._acks.pop(m, None)

    # -- subscribing ----------------------------------------------------------------------------------------
    def _subscribed(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self._keep(self._subacks, mid, list(codes))

    def subscribe_confirmed(self, filters: list[str], *, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the broker's answer. Mosquitto 2.x grants a filter its ACL denies (and then drops
        the messages): a granted subscription does not prove that anything will arrive."""
        wanted = [(f, qos) for f in filters]
        result, mid = self.subscribe(wanted)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise HqLinkError(f"cannot subscribe to {', '.join(filters)}: {mqtt.error_string(result)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                if self._lost is not None:
                    raise HqLinkError(self._lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HqLinkError(LinkProblem("timeout", f"no SUBACK for {', '.join(filters)} within "
                                                             f"{timeout:g} s"))
                self._cond.wait(min(left, 0.5))
            codes = self._subacks.pop(mid)
        refused = [f"{f} ({c})" for (f, _q), c in zip(wanted, codes, strict=False) if c.is_failure]
        if refused:
            raise HqLinkError(LinkProblem("subscribe_refused", f"the broker refused the subscription to "
                                                               f"{', '.join(refused)}"))
        self._filters += wanted

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread (safe to call more than once)."""
        self._filters = []
        self.disconnect()  # also ends paho's reconnect attempts after a failed connect
        self.loop_stop()


def connect(cfg: HqConfig, role: str, *, session: PersistentSession | None = None,
            on_message: Callable[[Any, Any, Any], None] | None = None,
            on_link_change: Callable[[LinkProblem | None], None] | None = None) -> HqClient:
    """A client connected to the configured broker, its network loop running; `close()` it when done.

    Raises HqLinkError (cannot connect, refused) or HqConfigError (unreadable TLS files, password source).
    `role` names the client in the broker's log (client id ``storelink-hq-{role}-{pid}-{random}``, or the
    session's). With a session, pass `on_message` here: the session's messages come right after the CONNACK.
    """
    client = HqClient(cfg, role, session)
    if on_message is not None:
        client.on_message = on_message
    client.on_link_change = on_link_change
    client.open()
    return client
