"""The local HTTP server: the ingest API for in-store systems and the status API.

``POST /api/v1/events`` answers 202 only after the event is committed to the outbox, so a 202 is a promise that
the event reaches head office. Everything else is read-only unless the caller presents the configured token.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from storelink.config import RunningConfig
from storelink.contract import IngestEvent
from storelink.outbox import Outbox, OutboxError, OutboxFull
from storelink.validation import describe_validation_error

log = logging.getLogger(__name__)
CONFIG_KEY: web.AppKey[RunningConfig] = web.AppKey("config", RunningConfig)
OUTBOX_KEY: web.AppKey[Outbox] = web.AppKey("outbox", Outbox)
STATUS_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status")
HEALTH_KEY: web.AppKey[Callable[[], list[str]]] = web.AppKey("health")
MAX_EVENTS_PER_POST = 1000
# At a stop, requests in progress get this long before they are cancelled (aiohttp waits 60 s by default, which a
# browser holding a live stream would add to every restart).
SHUTDOWN_TIMEOUT = 3.0
_ingest_list = TypeAdapter(list[IngestEvent])


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def require_token(request: web.Request) -> web.Response | None:
    """None when the request carries the configured action token; otherwise the 401/403 response to return."""
    token = request.app[CONFIG_KEY].current.http.token
    if not token:
        return error(403, "actions are disabled: no http.token is configured")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        return error(401, "a valid bearer token is required for this action")
    return None


async def post_events(request: web.Request) -> web.Response:
    max_body = request.app[CONFIG_KEY].current.http.max_body
    if request.content_length is not None and request.content_length > max_body:
        return error(413, f"body larger than {max_body} bytes")
    try:
        raw = await request.read()
        body = json.loads(raw)
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"body larger than {max_body} bytes")
    except (ValueError, UnicodeDecodeError) as err:
        return error(400, f"body is not valid JSON: {err}")
    single = isinstance(body, dict)
    if not single and not isinstance(body, list):
        return error(422, "body must be an event object or a list of event objects")
    if isinstance(body, list) and not 1 <= len(body) <= MAX_EVENTS_PER_POST:
        return error(422, f"a list must hold 1..{MAX_EVENTS_PER_POST} events")
    try:
        events = [IngestEvent.model_validate(body)] if single else _ingest_list.validate_python(body)
    except ValidationError as err:
        return error(422, "invalid event", problems=describe_validation_error(err))
    try:
        accepted = await request.app[OUTBOX_KEY].put_many([(e.kind, e.device, e.data) for e in events])
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
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return error(exc.status, exc.reason)
        raise


class HttpServer:
    """The local HTTP server: the ingest, status and health routes, and the routes the parts declare."""

    def __init__(self, config: RunningConfig, outbox: Outbox, status: Callable[[], dict[str, Any]],
                 health: Callable[[], list[str]]):
        self.config = config
        self.outbox = outbox
        self.status = status
        self.health = health
        self.routes: Sequence[web.RouteDef] = []  # the parts' routes, set by the composition root before start()
        self.runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.current.http.max_body, middlewares=[json_errors])
        app[CONFIG_KEY] = self.config
        app[OUTBOX_KEY] = self.outbox
        app[STATUS_KEY] = self.status
        app[HEALTH_KEY] = self.health
        app.router.add_post("/api/v1/events", post_events)
        app.router.add_get("/api/v1/status", get_status)
        app.router.add_get("/healthz", get_healthz)
        app.add_routes(self.routes)
        return app

    async def start(self) -> None:
        host, port = self.config.current.http.host_port
        self.runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        addresses = self.runner.addresses
        self.bound = (str(addresses[0][0]), int(addresses[0][1])) if addresses else (host, port)
        log.info("http listening on %s:%d", *self.bound)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
