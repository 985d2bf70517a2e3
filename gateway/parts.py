"""Parts: what the gateway runs beside the devices (the price book, remote config, commands, kiosk sessions, the
status page), and the supervisor that keeps them running.

A part declares what it adds: HTTP routes (``routes()``) and MQTT subscriptions (``subscriptions()``); the
composition root (storelink.app) installs them, nothing patches the server or the uplink. ``BasePart`` is the
extension point: subclass it, set ``name`` and override what the part needs.

The supervisor runs each part as devices are run: ``start()`` (open what it needs), then ``run()`` until
cancelled. A part whose start raises, or whose run raises or returns, is logged, stopped (``stop()`` closes
what it opened), reported (its status, ``/healthz``, a ``gateway.part_failed`` event, and
``gateway.part_recovered`` once it runs again) and started again with exponential backoff. It never takes the
outbox, the uplink, the devices or another part with it. While a part is not running its routes answer 503 and
its MQTT handlers wait (the message stays unacknowledged, so the broker keeps it) until it runs again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from storelink.downlink import HANDLER_TIMEOUT, Downlink, Handler
from storelink.outbox import iso_ts
from storelink.uplink import backoff_delay

log = logging.getLogger(__name__)

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FailureReport = Callable[[str, str, int, float], Awaitable[None]]  # (part, error, restarts, seconds to retry)
RecoveryReport = Callable[[str, int, float], Awaitable[None]]  # (part, restarts, seconds it was down)


@dataclass(frozen=True)
class Subscription:
    """An MQTT topic filter a part handles; QoS 1 messages are acknowledged after the handler returns, or after
    ``timeout`` seconds of handling (None: no bound of its own), whichever is first (storelink.uplink)."""

    topic_filter: str
    handler: Handler
    qos: int = 1
    timeout: float | None = HANDLER_TIMEOUT


class Part(Protocol):
    """What the gateway needs from a part. Build one in storelink.app.standard_parts."""

    @property
    def name(self) -> str:
        """Short and stable: the part's key in the status document, its logs and events."""
        ...

    def routes(self) -> Sequence[web.RouteDef]: ...

    def subscriptions(self) -> Sequence[Subscription]: ...

    async def start(self) -> None:
        """Open what the part needs (databases, files). Raise when it cannot; it is retried with backoff."""
        ...

    async def run(self) -> None:
        """Work until cancelled; raising (or returning) counts as a crash and the part is restarted."""
        ...

    async def stop(self) -> None:
        """Close what start() opened; called after run() ends for any reason, and after a failed start()."""
        ...

    def status(self) -> dict[str, Any] | None:
        """The part's section of GET /api/v1/status (under its name), or None for no section."""
        ...

    def health(self) -> list[str]:
        """Problems to report on /healthz while the part runs; [] when it is well."""
        ...


class BasePart:
    """The helper class parts subclass: every hook with a default that does nothing."""

    name: str = "part"

    def routes(self) -> Sequence[web.RouteDef]:
        return []

    def subscriptions(self) -> Sequence[Subscription]:
        return []

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        await asyncio.get_running_loop().create_future()  # nothing to do but stay installed

    async def stop(self) -> None:
        return None

    def status(self) -> dict[str, Any] | None:
        return None

    def health(self) -> list[str]:
        return []


class PartState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"


class _Supervised:
    """One part and its record: what the status page and /healthz say about it."""

    def __init__(self, part: Part):
        self.part = part
        self.name = part.name
        self.state = PartState.STARTING
        self.last_error: str | None = None
        self.restarts = 0
        self.since = time.time()
        self.next_start: float | None = None
        self.running = asyncio.Event()

    def enter(self, state: PartState, error: str | None = None) -> None:
        self.state, self.since = state, time.time()
        if state != PartState.FAILED:
            self.last_error = None
        else:
            self.last_error = error
        if state == PartState.RUNNING:
            self.running.set()
        else:
            self.running.clear()

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "last_error": self.last_error, "restarts": self.restarts,
                "since": iso_ts(self.since), "next_start": iso_ts(self.next_start) if self.next_start else None}


class PartSupervisor:
    def __init__(self, parts: Sequence[Part], on_failure: FailureReport, on_recovery: RecoveryReport,
                 backoff: tuple[float, float] = (1.0, 60.0)):
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"two parts share a name: {names}")
        self._parts = [_Supervised(p) for p in parts]
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self.backoff = backoff

    def failed(self) -> list[str]:
        return [s.name for s in self._parts if s.state == PartState.FAILED]

    @property
    def parts(self) -> list[Part]:
        return [s.part for s in self._parts]

    def state(self, name: str) -> PartState:
        return next(s.state for s in self._parts if s.name == name)

    # -- what the parts declare, guarded by their state ----------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        # The time bound is applied here, once the part runs: waiting for a part that is restarting is not the
        # handler taking too long (the message waits, unacknowledged, as the broker's).
        return [Subscription(sub.topic_filter, self._when_running(s, sub.handler, sub.timeout), sub.qos, None)
                for s in self._parts for sub in s.part.subscriptions()]

    def routes(self) -> list[web.RouteDef]:
        return [web.RouteDef(rd.method, rd.path, self._guarded(s, rd.handler), rd.kwargs)
                for s in self._parts for rd in s.part.routes()]

    @staticmethod
    def _when_running(sup: _Supervised, handler: Handler, timeout: float | None) -> Handler:
        async def handle(down: Downlink) -> None:
            await sup.running.wait()  # a message for a part that is (re)starting waits, unacknowledged
            bound = asyncio.timeout(timeout)
            try:
                async with bound:
                    await handler(down)
            except TimeoutError:
                if bound.expired():
                    raise TimeoutError(f"handler timed out after {timeout:g} s") from None
                raise

        return handle

    @staticmethod
    def _guarded(sup: _Supervised, handler: RouteHandler) -> RouteHandler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if sup.state != PartState.RUNNING:
                why = f": {sup.last_error}" if sup.last_error else ""
                return web.json_response({"error": f"the {sup.name} part is {sup.state.value}{why}"}, status=503)
            return await handler(request)

        return handle

    # -- reporting ---------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Each part's section (under its name) and "parts": every part's state."""
        out: dict[str, Any] = {"parts": {s.name: s.as_dict() for s in self._parts}}
        for s in self._parts:
            try:
                section = s.part.status()
            except Exception as err:  # one broken part must not hide the rest of the status
                section = {"error": f"{type(err).__name__}: {err}"}
            if section is not None:
                out[s.name] = section
        return out

    def health(self) -> list[str]:
        problems: list[str] = []
        for s in self._parts:
            if s.state == PartState.FAILED:
                problems.append(f"part {s.name} failed: {s.last_error}")
            elif s.state == PartState.RUNNING:
                try:
                    problems += [f"{s.name}: {p}" for p in s.part.health()]
                except Exception as err:
                    problems.append(f"{s.name}: health check failed: {type(err).__name__}: {err}")
        return problems

    # -- running -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for s in self._parts:
                tg.create_task(self._keep_running(s), name=f"part-{s.name}")

    async def _keep_running(self, sup: _Supervised) -> None:
        attempt = 0
        failed_at: float | None = None
        while True:
            started = time.monotonic()
            stage = "start"
            try:
                sup.enter(PartState.STARTING)
                await sup.part.start()
                stage = "run"
                sup.enter(PartState.RUNNING)
                log.info("part %s running", sup.name)
                if failed_at is not None:
                    await self._report(self._on_recovery(sup.name, sup.restarts, time.monotonic() - failed_at),
                                       sup.name)
                    failed_at = None
                await sup.part.run()
                raise RuntimeError("run() returned")
            except asyncio.CancelledError:
                sup.enter(PartState.STOPPED)
                await self._stop(sup)
                raise
            except Exception as err:
                failed_at = failed_at or time.monotonic()
                sup.restarts += 1
                sup.enter(PartState.FAILED, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
                log.error("part %s failed in %s(); restarting it", sup.name, stage, exc_info=True)
                await self._stop(sup)
            if time.monotonic() - started > 60:
                attempt = 0  # it ran a good while: the next failure starts the backoff afresh
            delay = backoff_delay(attempt, *self.backoff)
            sup.next_start = time.time() + delay
            await self._report(self._on_failure(sup.name, sup.last_error or "", sup.restarts, delay), sup.name)
            try:
                await asyncio.sleep(delay)
            finally:
                sup.next_start = None
            attempt += 1

    @staticmethod
    async def _stop(sup: _Supervised) -> None:
        try:
            await sup.part.stop()
        except Exception:
            log.exception("part %s: stop() failed", sup.name)

    @staticmethod
    async def _report(report: Awaitable[None], name: str) -> None:
        try:
            await report
        except Exception:  # the log line and the status already say it; the event is the copy for head office
            log.exception("cannot report on part %s", name)
