"""The MQTT uplink: drains the outbox to head office and dispatches downlink messages.

paho-mqtt's socket is driven from the asyncio loop (gateway/mqtt_loop.py), so paho's callbacks run on the loop
and no message crosses a thread; nothing of ours is locked around ``publish()`` (FIELD-NOTES: a lock that
``on_publish`` also takes deadlocks). Connecting runs in a worker thread; after a lost or refused connection the
uplink connects again with jittered exponential backoff. The drain keeps its own in-flight window, well below
paho's 65,535-message ceiling, and deletes an outbox row only on the PUBACK for that exact message. Messages in
flight when the link drops stay in paho's session and are resent (DUP) first on reconnect, so order holds; after
a restart the outbox replays from its oldest row, so duplicates can only be events that were in flight (or
delivered moments before a crash, whose lazy delete was lost: head office drops them by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel

from storelink import __version__
from storelink.config import MqttConfig
from storelink.contract import OUTBOX_REPORT_EVERY, OutboxStatePayload, StatusPayload, Topics
from storelink.downlink import HANDLER_TIMEOUT, Downlink, DownlinkRouter, Handler, Route
from storelink.mqtt_loop import LoopNetwork
from storelink.mqtt_problems import (
    SPECIFIC_CERT_PROBLEMS,
    Endpoint,
    LinkProblem,
    SocketErrorTrap,
    problem_closed_before_connack,
    problem_from_connack,
    problem_from_disconnect,
    problem_from_exception,
)
from storelink.outbox import Outbox, StoredEvent, iso_ts

log = logging.getLogger(__name__)


StatePayload = BaseModel | dict[str, Any] | bytes  # a contract model (storelink.contract); bytes b"" clears


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with full jitter, so 500 stores don't reconnect in the same second."""
    cap = min(high, low * (2 ** min(attempt, 20)))
    return random.uniform(low, max(low, cap))


class Uplink:
    def __init__(self, cfg: MqttConfig, store_id: str, outbox: Outbox, *, started_at: float | None = None,
                 groups: tuple[str, ...] = ()):
        self.cfg = cfg
        self.groups = list(groups)  # in the birth and the Last Will: head office matches group price batches by it
        self.topics = Topics(store_id, cfg.topic_prefix)
        self.outbox = outbox
        self.started_at = started_at or time.time()
        self.connected = False
        self.connected_since: float | None = None
        self.disconnected_since: float | None = time.time()
        self.last_error: str | None = None
        self.problem: str | None = None  # the code of the connection problem (storelink.mqtt_problems), for alerts
        self.last_progress = time.monotonic()  # the watchdog reads this
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected_evt = asyncio.Event()
        self._window_evt = asyncio.Event()
        self._report_now = asyncio.Event()
        self._awaiting_acks = False  # the drain waits for PUBACKs to free the window
        self._pubacks: list[tuple[int, bool, str]] = []  # taken once per burst read from the socket
        # Events the broker refused (an ACL, a quota): seq -> refusals. They stay in the outbox and are sent again
        # on their own with backoff; the cursor is not rewound, which would resend every event in flight after them.
        self._refused: dict[int, int] = {}
        self._refused_retry_at = math.inf
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._cursor = 0  # highest seq handed to paho
        self._attempt = 0
        self.downlink = DownlinkRouter(outbox)
        self._retained_state: dict[str, bytes] = {}
        self._unacked_subs: dict[int, str] = {}  # SUBSCRIBE mid -> filter, sent on this connection, not answered
        self._refused_subs: set[str] = set()  # filters the broker refused on this connection
        self._stopping = False
        self._client = self._make_client()
        self._net: LoopNetwork | None = None  # the client's socket on the loop, from run() on
        self._link: asyncio.Task[None] | None = None  # connects self._client and keeps it connected

    # -- setup ----------------------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        v5 = cfg.protocol == "5"
        t = cfg.tls
        self._endpoint = Endpoint(cfg.host, cfg.port, "mqtt", t is not None, t.ca if t else None,
                                  t.cert if t else None, 5.0, cfg.protocol)
        self._connack_seen = False  # did the broker answer CONNECT on this connection? (paho's callbacks, on the loop)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"storelink-{self.topics.store_id}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,  # paho reconnects only in its own loop; _stay_connected() does it here
        )
        # paho logs an ERROR per reconnect attempt (ours says why, once); the trap keeps its socket errors, which
        # are the only trace of a broker hanging up on our certificate (storelink.mqtt_problems).
        self._socket_errors = SocketErrorTrap(logging.getLogger("paho") if log.isEnabledFor(logging.DEBUG) else None)
        client.enable_logger(self._socket_errors.logger)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            t = cfg.tls
            client.tls_set(
                ca_certs=str(t.ca) if t.ca else None,
                certfile=str(t.cert) if t.cert else None,
                keyfile=str(t.key) if t.key else None,
                cert_reqs=ssl.CERT_NONE if t.insecure_skip_verify else ssl.CERT_REQUIRED,
            )
            if t.insecure_skip_verify:
                client.tls_insecure_set(True)
        client.will_set(self.topics.status, self._offline_payload(), qos=1, retain=True)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.manual_ack_set(True)  # downlink QoS 1 is acknowledged only after its handler ran
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *,
                  timeout: float | None = HANDLER_TIMEOUT) -> None:
        """Register before run(); subscriptions are renewed on every connect. ``timeout`` bounds one call (None: the
        handler bounds itself, and raises TimeoutError when it gives up)."""
        self.downlink.add(Route(topic_filter, qos, handler, timeout))
        if self.connected:
            mid = self._client.subscribe(topic_filter, qos)[1]
            if mid is not None:
                self._unacked_subs[mid] = topic_filter

    # -- paho callbacks (on the loop, from inside loop_read/loop_write/loop_misc) ------------------------------
    def _next_delay(self) -> float:
        delay = backoff_delay(self._attempt, self.cfg.reconnect_min, self.cfg.reconnect_max)
        self._attempt += 1
        return delay

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        if client is not self._client:
            return  # a client replaced by reconfigure(): its news is stale
        self._connack_seen = True
        if reason.is_failure:
            self._set_disconnected(problem_from_connack(reason, self._endpoint))
            return  # the broker closes the connection; _stay_connected() tries again after a backoff
        self._attempt = 0
        client.publish(self.topics.status, self._birth_payload(), qos=1, retain=True)
        mids = {client.subscribe(r.topic_filter, r.qos)[1]: r.topic_filter for r in self.downlink.routes}
        self._set_connected(bool(getattr(flags, "session_present", False)), mids)

    def _on_subscribe(self, client: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        if client is self._client:
            self._subscribed(mid, [str(c) for c in codes if c.is_failure])

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if client is not self._client or self._stopping:
            return
        socket_error = self._socket_errors.take()
        if self._connack_seen:
            problem = problem_from_disconnect(reason, socket_error)
        else:  # hung up before answering CONNECT: a refused client certificate, a TLS or protocol mismatch
            problem = problem_closed_before_connack(self._endpoint, socket_error)
        self._connack_seen = False
        self._set_disconnected(problem)

    def _connect_failed(self, client: mqtt.Client, err: BaseException) -> None:
        """DNS, TCP or the TLS handshake failed: connecting runs in a worker thread, which hands its exception here."""
        if client is self._client and not self._stopping:
            self._set_disconnected(problem_from_exception(err, self._endpoint))

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        if client is not self._client:
            return  # its mids mean nothing to the new client; reconfigure() rewound those events
        failed = reason.is_failure
        self._pubacks.append((mid, failed, str(reason) if failed else ""))  # taken after the read, in one go

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if client is not self._client:
            return  # unacknowledged: the broker redelivers it to the session that owns it
        props = getattr(msg, "properties", None)
        down = Downlink(
            topic=msg.topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )

        def ack() -> None:
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)  # the client that received it: a mid belongs to one connection

        self.downlink.dispatch(down, ack)

    # -- loop side ------------------------------------------------------------------------------------------
    def _birth_payload(self) -> bytes:
        return StatusPayload(state="online", store_id=self.topics.store_id, version=__version__,
                             started_at=iso_ts(self.started_at), protocol=self.cfg.protocol,
                             groups=self.groups).encode()

    def _offline_payload(self) -> bytes:
        """The Last Will and the goodbye; with the store's groups: head office may never have seen its birth."""
        return StatusPayload(state="offline", store_id=self.topics.store_id, groups=self.groups).encode()

    def _set_connected(self, session_present: bool, subscribe_mids: dict[int | None, str]) -> None:
        # Republished here on the loop, not in paho's on_connect: publish_state() runs on the loop too, so a state
        # that changes while the link comes up is either in this sweep or published by publish_state() itself.
        self.connected = True
        self._unacked_subs = {mid: f for mid, f in subscribe_mids.items() if mid is not None}
        self._refused_subs = set()
        for topic, payload in self._retained_state.items():
            self._client.publish(topic, payload, qos=1, retain=True)
        self.connected_since = time.time()
        self.disconnected_since = None
        self.last_error = None
        self.problem = None
        self._connected_evt.set()
        self._report_now.set()  # a fresh outbox report on every connect
        log.info("uplink connected to %s:%d (session present: %s)", self.cfg.host, self.cfg.port, session_present)

    def _set_disconnected(self, problem: LinkProblem) -> None:
        if not self.connected and (self.last_error or "").startswith("broker refused") and problem.code == "lost":
            return  # the refusal says why; the disconnect that follows it does not
        if problem.code == "client_cert_refused" and self.problem in SPECIFIC_CERT_PROBLEMS:
            return  # the same refusal without the broker's TLS alert: keep the reason it gave before
        why = problem.message
        if self.connected or self.last_error != why:
            log.warning("uplink %s", why)
        if self.connected:
            self.disconnected_since = time.time()
        self.connected = False
        self.connected_since = None
        self.last_error = why
        self.problem = problem.code
        self._connected_evt.clear()

    def _subscribed(self, mid: int, refusals: list[str]) -> None:
        topic_filter = self._unacked_subs.pop(mid, None)
        if refusals and topic_filter is not None:
            # An ACL that denies e.g. the prices topic: the store would silently never hear from head office.
            self._refused_subs.add(topic_filter)
            self.last_error = f"broker refused a subscription to {topic_filter}: {', '.join(refusals)}"
            log.error("uplink %s", self.last_error)

    def _take_pubacks(self) -> None:
        """After each read from the socket: one outbox ack and one wake-up of the drain per burst of PUBACKs."""
        if not self._pubacks:
            return
        pubacks, self._pubacks = self._pubacks, []
        delivered: list[int] = []
        refused = False
        for mid, failed, reason in pubacks:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # a birth/state message, not an outbox event
            if failed:
                self._note_refusal(seq, reason)
                refused = True
            else:
                delivered.append(seq)
                if self._refused:
                    self._refused.pop(seq, None)
        if not delivered and not refused:
            return
        self.last_progress = time.monotonic()
        self.outbox.ack(delivered)
        if refused or len(self._inflight) <= self.cfg.max_inflight:
            self._window_evt.set()  # refill half the hand-over window with one read, not one per PUBACK

    def _note_refusal(self, seq: int, reason: str) -> None:
        refusals = self._refused[seq] = self._refused.get(seq, 0) + 1
        delay = backoff_delay(refusals - 1, 1.0, 300.0)
        self._refused_retry_at = min(self._refused_retry_at, time.monotonic() + delay)
        self.last_error = f"broker refused event seq {seq}: {reason}"
        if refusals & (refusals - 1) == 0:  # the 1st, 2nd, 4th, 8th... refusal: a log line, not a flood
            log.error("broker refused event seq %d (%d times): %s; kept, sent again in %.0f s", seq, refusals,
                      reason, delay)

    async def _retry_refused(self, room: int) -> None:
        """Send refused events again, on their own, once their backoff has passed."""
        self._refused_retry_at = math.inf  # set again by the next refusal
        seqs = sorted(self._refused)[:room]
        waiting = await asyncio.to_thread(self.outbox.read_seqs, seqs)
        for gone in set(seqs) - {ev.seq for ev in waiting}:
            self._refused.pop(gone, None)  # delivered meanwhile (a resend after a reconnect)
        for ev in waiting:
            if not self._publish_event(ev):
                self._refused_retry_at = time.monotonic() + 1.0  # not handed over: try again, not never
                break

    def _publish_event(self, ev: StoredEvent) -> bool:
        """Hand one outbox event to paho and track it until its PUBACK; False when paho refuses to queue it."""
        info = self._client.publish(self.topics.event(ev.kind), ev.payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("paho refused to queue seq %d: %s", ev.seq, mqtt.error_string(info.rc))
            return False
        self._inflight[info.mid] = ev.seq
        return True

    # -- public API -----------------------------------------------------------------------------------------
    def publish_state(self, topic: str, payload: StatePayload) -> None:
        """Retained latest-state message; remembered and republished on every reconnect. Build it from a model of
        storelink.contract (b"" clears a retained state)."""
        if isinstance(payload, BaseModel):
            data = payload.model_dump_json().encode()
        elif isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload, separators=(",", ":")).encode()
        if self._retained_state.get(topic) == data:
            return
        self._retained_state[topic] = data
        if self.connected:
            self._client.publish(topic, data, qos=1, retain=True)

    def publish_direct(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       correlation_data: bytes | None = None, response_topic: str | None = None) -> None:
        """A reply, request or notice that needs no outbox (command responses, cart requests); lost if the link
        is down. MQTT 5 only: correlation data and a response topic go in as properties."""
        props = None
        if self.cfg.protocol == "5" and (correlation_data is not None or response_topic is not None):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if response_topic is not None:
                props.ResponseTopic = response_topic
        self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "connected_since": iso_ts(self.connected_since) if self.connected_since else None,
            "offline_since": iso_ts(self.disconnected_since) if self.disconnected_since else None,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "protocol": self.cfg.protocol,
            "in_flight": len(self._inflight),
            "refused_events": len(self._refused),  # the broker refuses them; kept in the outbox and retried
            # Connected and every subscription granted: from here on, head office's commands reach this store.
            "subscribed": self.connected and not self._unacked_subs and not self._refused_subs,
            "refused_subscriptions": sorted(self._refused_subs),
            "downlink": dict(self.downlink.counts),
            "last_error": self.last_error,
            "problem": self.problem,
        }

    async def run(self) -> None:
        """Connect and drain until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._start_client()
        reporter = asyncio.ensure_future(self._report_outbox())
        try:
            await self._drain()
        finally:
            reporter.cancel()

    async def _report_outbox(self) -> None:
        """Retained ``outbox/state``: head office's fleet view shows the backlog, and its gap tracking learns
        from ``evicted_total`` when every eviction has been reported (docs/mqtt.md). Made fresh on every connect
        and every OUTBOX_REPORT_EVERY seconds, never republished from memory like the other retained states: a
        report from before an outage, sent again at reconnect, would tell head office a stale eviction count as
        news."""
        while True:
            await self._connected_evt.wait()
            try:
                report = OutboxStatePayload.model_validate(await asyncio.to_thread(self.outbox.report))
                self.publish_direct(self.topics.outbox_state, report.model_dump_json().encode(), retain=True)
            except Exception as err:  # a closed outbox at shutdown; never let the report stop the uplink
                log.debug("outbox report: %s", err)
            self._report_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTBOX_REPORT_EVERY):
                    await self._report_now.wait()

    def _start_client(self) -> None:
        assert self._loop is not None
        props = None
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry
        self._client.connect_async(
            self.cfg.host, self.cfg.port, self.cfg.keepalive,
            clean_start=False if self.cfg.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._net = LoopNetwork(self._client, self._loop, self._take_pubacks)
        self._link = asyncio.create_task(self._stay_connected(self._client, self._net), name="uplink-link")

    async def _stay_connected(self, client: mqtt.Client, net: LoopNetwork) -> None:
        """Connect now; whenever the connection fails or is lost, connect again after a jittered backoff."""
        while client is self._client and not self._stopping:
            try:
                await net.connect()
            except Exception as err:  # whatever paho raises, this loop must go on connecting
                if not isinstance(err, OSError):  # refused, unreachable, TLS: expected; anything else is a bug
                    log.exception("uplink: connecting raised")
                self._connect_failed(client, err)
            else:
                if client is not self._client:  # reconfigured while connecting: this one is not wanted
                    client.disconnect()
                    return
                await net.closed.wait()
            if client is not self._client or self._stopping:
                return
            await asyncio.sleep(self._next_delay())

    async def reconfigure(self, cfg: MqttConfig) -> None:
        """Switch to new broker settings while running (remote config): say goodbye on the old connection,
        connect a new client with ``cfg``. Nothing accepted is lost: events handed to the old client but not yet
        acknowledged are still in the outbox and are sent again, in order, on the new connection.
        """
        if cfg.topic_prefix != self.cfg.topic_prefix:
            raise ValueError("mqtt.topic_prefix cannot change while running (every topic would move)")
        old, old_net, old_link, was_connected = self._client, self._net, self._link, self.connected
        self.cfg = cfg
        if self._inflight:
            self._cursor = min(self._cursor, min(self._inflight.values()) - 1)
            self._inflight.clear()
        self._pubacks.clear()  # the old client's mids would match the new client's
        self._attempt = 0
        self._set_disconnected(LinkProblem("reconfiguring", f"reconnecting to {cfg.host}:{cfg.port} with new "
                                                            "settings"))
        self._client = self._make_client()  # from here on the old client's callbacks are ignored
        self._window_evt.set()
        if self._loop is not None:
            self._start_client()
        if old_link is not None:
            old_link.cancel()
        if was_connected:
            old.publish(self.topics.status, self._offline_payload(), qos=0, retain=True)
        await self._hang_up(old, old_net)

    async def _hang_up(self, client: mqtt.Client, net: LoopNetwork | None, grace: float = 2.0) -> None:
        """DISCONNECT (after what is queued, the offline status included) and wait for the socket to close."""
        client.disconnect()
        if net is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await net.closed.wait()
            net.close()

    async def _drain(self) -> None:
        # paho keeps at most max_inflight unacknowledged on the wire; we hand it twice that, so it refills the wire
        # from its own queue on each PUBACK (inside loop_read) instead of waiting for the drain's next turn.
        window = 2 * self.cfg.max_inflight
        while True:
            if not self.connected:
                await self._connected_evt.wait()
            room = window - len(self._inflight)
            if room <= 0:
                self._window_evt.clear()
                self._awaiting_acks = True
                try:
                    await self._window_evt.wait()
                finally:
                    self._awaiting_acks = False
                self.last_progress = time.monotonic()
                continue
            if self._refused and time.monotonic() >= self._refused_retry_at:
                await self._retry_refused(room)
                continue
            batch = await asyncio.to_thread(self.outbox.read_after, self._cursor, min(room, 500))
            if not batch:
                self.last_progress = time.monotonic()
                await self.outbox.wait_for_new(1.0)
                continue
            for ev in batch:
                if ev.seq <= self._cursor:
                    continue  # an older event is being retried; keep order
                if not self._publish_event(ev):
                    await asyncio.sleep(1)
                    break
                self._cursor = ev.seq
            self.last_progress = time.monotonic()

    def progress_probe(self) -> float:
        """For the watchdog: the drain loop's last turn. Waiting for the link or for the broker's PUBACKs is not
        a hang of ours (a slow broker is reported by the status, not cured by a restart)."""
        if not self.connected or self._awaiting_acks:
            return time.monotonic()
        return self.last_progress

    def caught_up(self) -> bool:
        """Everything committed to the outbox has been published and acknowledged."""
        return not self._inflight and self._cursor >= self.outbox.last_seq

    async def stop(self, drain_task: asyncio.Task[None] | None = None, grace: float = 3.0) -> None:
        """Keep draining while connected until caught up (or `grace` passes), then say goodbye and disconnect.

        What is not delivered by then stays in the outbox for the next start.
        """
        deadline = time.monotonic() + grace
        while self.connected and not self.caught_up() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if drain_task is not None:
            drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain_task
        self._stopping = True
        if self._link is not None:
            self._link.cancel()
        if self.connected:
            info = self._client.publish(self.topics.status, self._offline_payload(), qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while not info.is_published() and self.connected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await self._hang_up(self._client, self._net)
