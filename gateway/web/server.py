"""The local HTTP server: the ingest API for in-store systems and the status API.

``POST /api/v1/events`` answers 202 only after the event is committed to the outbox, so a 202 is a promise that
the event reaches head office. Everything else is read-only unless the caller presents the configured token.

Hostile or broken clients are bounded: a request's head must arrive within ``http.request_timeout`` seconds (and
an idle keep-alive connection is closed after as long), a body gets the same time again, at most
``http.max_connections`` connections are served at once and ``http.max_connections_per_peer`` from one address
(more are answered 503 and closed), and a malformed request is logged as one line naming its peer and the kind
of error, never with the request's bytes. Every JSON body goes through ``read_json`` (storelink.safe_json).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import TypeAdapter, ValidationError

from storelink import safe_json
from storelink.config import RunningConfig
from storelink.contract import IngestEvent
from storelink.outbox import EventRejected, Outbox, OutboxError, OutboxFull
from storelink.system.logs import exception_summary, loggable_id
from storelink.validation import describe_validation_error

log = logging.getLogger(__name__)
# aiohttp's own logger for request errors would write the offending bytes and a traceback; this one is filtered.
request_log = logging.getLogger("storelink.web.requests")
Rejections = collections.Counter[tuple[str, str]]  # (surface, reason) -> count: the status's "rejections"
CONFIG_KEY: web.AppKey[RunningConfig] = web.AppKey("config", RunningConfig)
OUTBOX_KEY: web.AppKey[Outbox] = web.AppKey("outbox", Outbox)
STATUS_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status")
HEALTH_KEY: web.AppKey[Callable[[], list[str]]] = web.AppKey("health")
REJECTIONS_KEY: web.AppKey[Rejections] = web.AppKey("rejections")
MAX_EVENTS_PER_POST = 1000
# At a stop, requests in progress get this long before they are cancelled (aiohttp waits 60 s by default, which a
# browser holding a live stream would add to every restart).
SHUTDOWN_TIMEOUT = 3.0
_ingest_list = TypeAdapter(list[IngestEvent])


class BadRequestBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON through safe_json, read within ``http.request_timeout``. BadRequestBody (400,
    408 or 413) otherwise; every JSON body the gateway accepts comes through here."""
    http = request.app[CONFIG_KEY].current.http
    if request.content_length is not None and request.content_length > http.max_body:
        raise BadRequestBody(413, f"body larger than {http.max_body} bytes")
    try:
        async with asyncio.timeout(http.request_timeout):
            raw = await request.read()
    except TimeoutError:
        raise BadRequestBody(408, f"body not received within {http.request_timeout:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BadRequestBody(413, f"body larger than {http.max_body} bytes") from None
    try:
        return safe_json.loads(raw, max_bytes=http.max_body)
    except safe_json.JsonRejected as err:
        raise BadRequestBody(400, f"body is not valid JSON: {err.reason}") from None


def require_token(request: web.Request) -> web.Response | None:
    """None when the request carries the configured action token; otherwise the 401/403 response to return."""
    token = request.app[CONFIG_KEY].current.http.token
    if not token:
        return error(403, "actions are disabled: no http.token is configured")
    given = request.headers.get("Authorization", "")
    # Header bytes that are not UTF-8 arrive surrogate-escaped: compare bytes, never raise on them.
    if not given.startswith("Bearer ") or not hmac.compare_digest(
        given[7:].encode("utf-8", "surrogateescape"), token.encode()
    ):
        return error(401, "a valid bearer token is required for this action")
    return None


async def post_events(request: web.Request) -> web.Response:
    try:
        body = await read_json(request)
    except BadRequestBody as err:
        return error(err.status, err.message)
    single = isinstance(body, dict)
    if not single and not isinstance(body, list):
        return error(422, "body must be an event object or a list of event objects")
    if isinstance(body, list) and not 1 <= len(body) <= MAX_EVENTS_PER_POST:
        return error(422, f"a list must hold 1..{MAX_EVENTS_PER_POST} events")
    try:
        events = [IngestEvent.model_validate(body)] if single else _ingest_list.validate_python(body)
    except ValidationError as err:
        return error(422, "invalid event", problems=describe_validation_error(err)[:20])
    try:
        accepted = await request.app[OUTBOX_KEY].put_many([(e.kind, e.device, e.data) for e in events])
    except EventRejected as err:
        return error(422, str(err))
    except OutboxFull as err:
        log.warning("ingest refused: %s", err)
        return error(507, str(err))
    except OutboxError as err:
        log.error("ingest failed: %s", err)
        return error(503, str(err))
    out = [{"id": a.id, "seq": a.seq} for a in accepted]
    return web.json_response(out[0] if single else {"accepted": out}, status=202)


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS_KEY]())


async def get_healthz(request: web.Request) -> web.Response:
    problems = request.app[HEALTH_KEY]()
    return web.json_response({"ok": not problems, "problems": problems}, status=503 if problems else 200)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await api_errors(request, handler)
    if 400 <= response.status < 500:
        request.app[REJECTIONS_KEY]["http", str(response.status)] += 1
    return response


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """HTTP errors under /api/ as JSON, a handler's bug as a plain 500 (shared with head office's dashboard, which
    keeps no store rejection counters; json_errors adds them for the store's API)."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return error(exc.status, exc.reason)
        raise
    except BadRequestBody as err:
        return error(err.status, err.message)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as err:  # a bug: the client gets a plain 500, the log the code location (no request data)
        request_log.error("%s %s failed: %s", request.method, loggable_id(request.rel_url.path),
                          exception_summary(err))
        return error(500, "internal error")


async def expect_continue(request: web.Request) -> None:
    """Every route's ``Expect`` handler. aiohttp's own echoes the header into a 417 and fails with a 500 when the
    header holds bytes that are not UTF-8; this one never quotes it."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return
    raise web.HTTPExpectationFailed(text="only 'Expect: 100-continue' is understood")


async def no_route(request: web.Request) -> web.StreamResponse:
    """The last route: what aiohttp would answer for a path no route has (404, or 405 with Allow), here so that its
    Expect header is handled by expect_continue too."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


class RequestErrorFilter(logging.Filter):
    """Rewrites aiohttp's request-error records (on ``request_log``): one line with the peer and the error's
    kind. aiohttp's text quotes the bytes it could not parse (a header with a customer's name in it, say) and
    adds a traceback; neither is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            if isinstance(exc, HttpProcessingError):
                what = f"malformed request refused with {exc.code} ({type(exc).__name__})"
            else:
                what = f"request failed: {exception_summary(exc)}"
            record.msg, record.args = "HTTP %s from %s", (what, peer)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


request_log.addFilter(RequestErrorFilter())


_BUSY_BODY = b'{"error":"too many connections; try again shortly"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _Gate(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: admits it under the site's limits (else a 503 and
    the connection is closed before a byte is read) and passes everything on to aiohttp's handler."""

    def __init__(self, site: LimitedSite, factory: Callable[[], asyncio.Protocol]):
        self.site = site
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.host = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self.site.admit(self.host):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_BUSY)
            transport.close()
            return
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.site.release(self.host)
            self.inner.connection_lost(exc)


class LimitedSite(web.TCPSite):
    """A TCP site that serves at most ``max_connections`` connections at once, and at most ``per_peer`` from one
    address (one misbehaving host on the store network cannot take every slot)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int, per_peer: int):
        super().__init__(runner, host, port, reuse_address=True)
        self.max_connections = max_connections
        self.per_peer = per_peer
        self.open: dict[str, int] = {}
        self.refused = 0

    def admit(self, host: str) -> bool:
        if sum(self.open.values()) >= self.max_connections or self.open.get(host, 0) >= self.per_peer:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th...: a flood is not a log flood
                log.warning("http: %d connection(s) refused so far: over the limit of %d (%d per address)",
                            self.refused, self.max_connections, self.per_peer)
            return False
        self.open[host] = self.open.get(host, 0) + 1
        return True

    def release(self, host: str) -> None:
        left = self.open.get(host, 1) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner; the listening socket is ours
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self, server), self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)


class ListenError(Exception):
    """The HTTP server cannot have its address (in use, not an address of this machine, no permission). The
    caller names the setting to change: `[http] listen` for `storelink run`, `--listen` for the demo."""

    def __init__(self, address: str, err: OSError):
        self.address = address
        # (asyncio's message repeats the address: the errno's own text is what a person needs)
        self.reason = (os.strerror(err.errno) if err.errno else str(err)).lower()
        super().__init__(f"cannot listen on {address}: {self.reason}")

    def explain(self, option: str) -> str:
        """One line for a person: what failed, why, and what to change."""
        in_use = self.reason == "address already in use"
        hint = " (another program, or another StoreLink, is using it)" if in_use else ""
        return f"cannot listen on {self.address}: {self.reason}{hint}; change {option}"


class HttpServer:
    """The local HTTP server: the ingest, status and health routes, and the routes the parts declare."""

    def __init__(self, config: RunningConfig, outbox: Outbox, status: Callable[[], dict[str, Any]],
                 health: Callable[[], list[str]], rejections: Rejections | None = None):
        self.config = config
        self.outbox = outbox
        self.status = status
        self.health = health
        self.rejections: Rejections = rejections if rejections is not None else collections.Counter()
        self.routes: Sequence[web.RouteDef] = []  # the parts' routes, set by the composition root before start()
        self.runner: web.AppRunner | None = None
        self.site: LimitedSite | None = None
        self.bound: tuple[str, int] | None = None

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.current.http.max_body, middlewares=[json_errors])
        app[CONFIG_KEY] = self.config
        app[OUTBOX_KEY] = self.outbox
        app[STATUS_KEY] = self.status
        app[HEALTH_KEY] = self.health
        app[REJECTIONS_KEY] = self.rejections
        app.router.add_post("/api/v1/events", post_events, expect_handler=expect_continue)
        app.router.add_get("/api/v1/status", get_status, expect_handler=expect_continue)
        app.router.add_get("/healthz", get_healthz, expect_handler=expect_continue)
        app.add_routes([web.RouteDef(rd.method, rd.path, rd.handler, {**rd.kwargs, "expect_handler": expect_continue})
                        for rd in self.routes])
        app.router.add_route("*", "/{path:.*}", no_route, expect_handler=expect_continue)
        return app

    async def start(self) -> None:
        http = self.config.current.http
        host, port = http.host_port
        # keepalive_timeout also closes a connection whose request head has not fully arrived by then: aiohttp
        # arms it at connect and after each response, and closes a connection still waiting for a request.
        self.runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT, logger=request_log,
                                    keepalive_timeout=http.request_timeout)
        await self.runner.setup()
        self.site = LimitedSite(self.runner, host, port, http.max_connections, http.max_connections_per_peer)
        try:
            await self.site.start()
        except OSError as err:
            await self.stop()
            raise ListenError(self.config.current.http.listen, err) from None
        addresses = self.runner.addresses
        self.bound = (str(addresses[0][0]), int(addresses[0][1])) if addresses else (host, port)
        log.info("http listening on %s:%d", *self.bound)

    def connections(self) -> dict[str, int]:
        """For the status: connections open now, and refused over the limits since start."""
        site = self.site
        return {"connections": sum(site.open.values()) if site is not None else 0,
                "refused_connections": site.refused if site is not None else 0}

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
