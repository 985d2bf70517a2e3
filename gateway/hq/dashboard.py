"""`storelink hq serve`: head office's read-only fleet dashboard, its JSON API and `/metrics`.

Plain files beside this module (no build step, like the store's status page), polling the JSON API:

    GET /                         the fleet: every store, filter by group and problem, search, pages
    GET /store?id=STORE           one store: devices, prices, recent events, seq gaps, alerts
    GET /api/v1/fleet             ?group= &problem= &q= &after= &limit=   (keyset pages of stores)
    GET /api/v1/stores/{id}       one store's detail
    GET /api/v1/alerts            ?store= &kind= &all=1 &before= &limit=
    GET /api/v1/groups
    GET /metrics                  Prometheus: fleet-level gauges (storelink.hq.fleet_metrics)
    GET /healthz

Nothing here writes: the database connection is read-only (PostgreSQL) and there is no action to take. Queries run
in a thread, never on the event loop. Bind it to loopback or put it behind head office's reverse proxy (SSO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

import storelink.web
from storelink.hq.config import HqConfig, HqConfigError
from storelink.hq.db import DEFAULT_DATABASE, Database, DatabaseError, open_database
from storelink.hq.fleet_view import alert_list, fleet_page, groups, store_detail

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent
STATIC = {"fleet.js": "text/javascript", "store.js": "text/javascript", "common.js": "text/javascript",
          "fleet.css": "text/css"}
SHARED = {"dom.js": "text/javascript", "style.css": "text/css"}  # the store's status page files, served as they are
SHARED_DIR = Path(storelink.web.__file__).parent
DB_KEY: web.AppKey[Database] = web.AppKey("db")
LOCK_KEY: web.AppKey[asyncio.Lock] = web.AppKey("db_lock")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))


async def _query(request: web.Request, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # One connection, one query at a time (its driver is not for concurrent use); in a thread, off the loop.
    async with request.app[LOCK_KEY]:
        return await asyncio.to_thread(fn, request.app[DB_KEY], *args, **kwargs)


def _int(request: web.Request, name: str, default: int | None = None) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer") from None


async def api_fleet(request: web.Request) -> web.Response:
    q = request.query
    try:
        page = await _query(request, fleet_page, group=q.get("group") or None, problem=q.get("problem") or None,
                            search=q.get("q") or None, after=q.get("after") or None,
                            limit=_int(request, "limit", 100) or 100)
    except ValueError as err:
        return _json({"error": str(err)}, 400)
    return _json(page)


async def api_store(request: web.Request) -> web.Response:
    detail = await _query(request, store_detail, request.match_info["store"])
    if detail is None:
        return _json({"error": f"no store {request.match_info['store']!r} has reported to head office"}, 404)
    return _json(detail)


async def api_alerts(request: web.Request) -> web.Response:
    q = request.query
    return _json(await _query(request, alert_list, store=q.get("store") or None, kind=q.get("kind") or None,
                              open_only=q.get("all") != "1", before=_int(request, "before"),
                              limit=_int(request, "limit", 100) or 100))


async def api_groups(request: web.Request) -> web.Response:
    return _json({"groups": await _query(request, groups)})


async def healthz(request: web.Request) -> web.Response:
    try:
        await _query(request, lambda db: db.query("SELECT 1"))
    except DatabaseError as err:
        return _json({"ok": False, "problems": [str(err)]}, 503)
    return _json({"ok": True, "problems": []})


async def metrics(request: web.Request) -> web.Response:
    from storelink.hq.fleet_metrics import render

    body, content_type = await _query(request, render)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _page(name: str) -> Callable[[web.Request], Any]:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

    return handler


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name in SHARED:
        return web.FileResponse(SHARED_DIR / name, headers={"Content-Type": SHARED[name], "Cache-Control": "no-cache"})
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache"})


@web.middleware
async def database_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except DatabaseError as err:
        log.error("dashboard: %s", err)
        return _json({"error": f"database: {err}"}, 503)


def build_app(db: Database) -> web.Application:
    # The store API's pieces: HTTP errors under /api/ as JSON, and an Expect handler that never turns a header of
    # non-UTF-8 bytes into a 500 (on every route, the catch-all for unknown paths too).
    from storelink.web.server import api_errors, expect_continue, no_route

    app = web.Application(middlewares=[api_errors, database_errors])
    app[DB_KEY] = db
    app[LOCK_KEY] = asyncio.Lock()
    for path, handler in (("/", _page("fleet.html")), ("/store", _page("store.html")), ("/static/{name}", static),
                          ("/api/v1/fleet", api_fleet), ("/api/v1/stores/{store}", api_store),
                          ("/api/v1/alerts", api_alerts), ("/api/v1/groups", api_groups), ("/metrics", metrics),
                          ("/healthz", healthz)):
        app.router.add_get(path, handler, expect_handler=expect_continue)
    app.router.add_route("*", "/{path:.*}", no_route, expect_handler=expect_continue)
    return app


class Dashboard:
    """The dashboard as a part another program can run (the demo): start() binds, stop() closes."""

    def __init__(self, database: str, listen: str = "127.0.0.1:8090", password: str | None = None):
        self.database, self.listen, self.password = database, listen, password
        self.runner: web.AppRunner | None = None
        self.db: Database | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        from storelink.hq.schema import migrate

        host, _, port = self.listen.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--listen: expected HOST:PORT, got {self.listen!r}")

        def open_read_only() -> Database:
            setup = open_database(self.database, password=self.password, application="storelink-hq-serve")
            try:
                migrate(setup)  # a dashboard started before any ingest worker still finds its tables
            finally:
                setup.close()
            return open_database(self.database, password=self.password, readonly=True,
                                 application="storelink-hq-serve")

        self.db = await asyncio.to_thread(open_read_only)
        self.runner = web.AppRunner(build_app(self.db), access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, host or "127.0.0.1", int(port)).start()
        address = self.runner.addresses[0]
        self.bound = (str(address[0]), int(address[1]))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.db is not None:
            self.db.close()
            self.db = None


async def _serve(args: argparse.Namespace, cfg: HqConfig) -> int:
    import signal

    dash = Dashboard(cfg.database_url or DEFAULT_DATABASE, args.listen, cfg.database_password())
    try:
        await dash.start()  # DatabaseError and OSError: one line (storelink.hq.cli)
    except ValueError as err:
        raise HqConfigError(str(err)) from None
    assert dash.bound is not None
    log.info("fleet dashboard on http://%s:%d/ (read-only)", *dash.bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await dash.stop()
    return 0


def cmd_serve(args: argparse.Namespace, cfg: HqConfig) -> int:
    return asyncio.run(_serve(args, cfg))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (default %(default)s)")
    p.set_defaults(hq_handler=cmd_serve)
