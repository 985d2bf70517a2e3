"""Head office's messages to this store: routed to the handlers that subscribed, each bounded in time.

The uplink owns the MQTT connection and hands every received message here with a way to acknowledge it. A
QoS 1 message is acknowledged only after its handlers ran (manual acks), so one that arrives while the gateway
stops is delivered again to the next run. A handler that raises or overruns its time costs that one message:
it is acknowledged anyway (left unacknowledged it would come back after every restart) and reported to head
office as ``downlink.failed``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from storelink.outbox import Outbox
from storelink.system.logs import exception_summary, loggable_id

log = logging.getLogger(__name__)

# How long one handler may take with one message before it is cancelled and the message acknowledged anyway
# (a subscription that legitimately takes longer says so: remote config waits for its [mqtt] trial).
HANDLER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Downlink:
    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


Handler = Callable[[Downlink], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    topic_filter: str
    qos: int
    handler: Handler
    timeout: float | None  # None: the handler bounds itself, and raises TimeoutError when it gives up


class DownlinkRouter:
    """The subscriptions, and the running of a message's handlers (each in a task of its own)."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.routes: list[Route] = []
        self.counts = {"handled": 0, "failed": 0, "timed_out": 0}
        self.rejections: collections.Counter[tuple[str, str]] = collections.Counter()  # the gateway's, once built
        self._tasks: set[asyncio.Future[None]] = set()  # referenced until done (the loop keeps weak references)

    def add(self, route: Route) -> None:
        self.routes.append(route)

    def dispatch(self, down: Downlink, ack: Callable[[], None]) -> None:
        """Run the handlers whose filter matches, then ``ack()`` (unless the gateway stops first)."""
        handlers = [r for r in self.routes if mqtt.topic_matches_sub(r.topic_filter, down.topic)]
        task = asyncio.ensure_future(self._run(down, handlers, ack))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, down: Downlink, routes: list[Route], ack: Callable[[], None]) -> None:
        failures: list[str] = []
        for route in routes:
            try:
                async with asyncio.timeout(route.timeout):
                    await route.handler(down)
            except TimeoutError as err:
                self.counts["timed_out"] += 1
                self.rejections["downlink", "timed_out"] += 1
                failures.append(str(err) or "handler timed out")
            except Exception as err:
                # The handler reports what it can to head office itself; what escapes is a bug. The log gets the
                # code location, not the exception's text (it may quote the payload).
                self.counts["failed"] += 1
                self.rejections["downlink", "failed"] += 1
                failures.append(f"handler failed ({type(err).__name__})")
                log.error("handler for %s failed: %s", loggable_id(down.topic), exception_summary(err))
        self.counts["handled"] += 1
        ack()
        if failures:
            log.error("downlink message on %s: %s; acknowledged and dropped", loggable_id(down.topic),
                      "; ".join(failures))
            try:
                await self.outbox.put("downlink.failed", "gateway", {
                    "topic": down.topic[:256], "bytes": len(down.payload), "errors": failures})
            except Exception as err:  # the log line above is the record that matters
                log.error("cannot record downlink.failed: %s", err)
