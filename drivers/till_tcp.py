"""``till_tcp``: tills that speak the StoreLink till protocol (docs/till-protocol.md) natively.

One ``[[devices]]`` entry per till, matched by ``till_id`` to the HELLO the till sends when it connects to the
gateway's till port. The till sends SALE (answered only once the sale is durable in the outbox) and LOOKUP
(answered from the "prices" service); the gateway drives price changes with PREPARE / HOLD / COMMIT / FINAL /
ABORT (the ``TillPriceTarget`` protocol, price_role "till"). A till that says protocol 1 in HELLO gets no HOLD or
FINAL; the price coordinator then holds its COMMIT back while that would charge more than the shelf shows.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import Field, IPvAnyNetwork, ValidationError, field_validator, model_validator

from storelink import safe_json
from storelink.drivers import till_protocol as tp
from storelink.drivers.base import DeviceConfig, DeviceContext, Driver, Health, PrepareFailed, PriceChange
from storelink.drivers.till_listener import TillConnection, TillListener, TillRejected
from storelink.outbox import EventRejected
from storelink.system.logs import exception_summary, loggable_id

log = logging.getLogger(__name__)
_SALE_FIELDS = frozenset(tp.Sale.model_fields) | frozenset(tp.SaleLine.model_fields)  # loggable parts of a loc
BAD_INPUT_CODES = {tp.BAD_JSON, tp.LINE_TOO_LONG, tp.UNKNOWN_TYPE, tp.BAD_REQUEST}

try:
    GATEWAY_VERSION = version("storelink")
except PackageNotFoundError:  # running from a source tree that was never installed
    GATEWAY_VERSION = "unknown"


class TillTcpConfig(DeviceConfig):
    listen: str = Field(f"127.0.0.1:{tp.DEFAULT_PORT}", description="address the gateway listens on for tills; "
                        "a till on the store network needs e.g. 0.0.0.0:7700 and then `secret` or `allow`")
    till_id: str | None = Field(None, min_length=1, max_length=64,
                                description="what the till sends in HELLO; defaults to the device id")
    secret: str | None = Field(None, min_length=16, repr=False, description="shared secret the till sends in HELLO")
    allow: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256,
                                       description="addresses/networks this till may connect from (empty: any)")
    request_timeout: float = Field(10.0, gt=0, le=300, description="seconds the till has to answer the gateway")
    ping_interval: float = Field(30.0, ge=1, le=3600, description="PING the till after this many idle seconds")
    prepare_chunk: int = Field(500, ge=1, le=10_000, description="items per PREPARE message")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        tp.parse_address(v)
        return v

    @model_validator(mode="after")
    def _closed_by_default(self) -> TillTcpConfig:
        # Anyone who can reach an open till port can post sales: off the loopback interface, a till must prove
        # who it is (secret) or where it is (allow).
        host, _port = tp.parse_address(self.listen)
        if not _is_loopback(host) and self.secret is None and not self.allow:
            raise ValueError(f"listen {self.listen!r} is reachable from the network: set `secret` (what the till "
                             "sends in HELLO) or `allow` (its addresses), or both")
        return self

    def admits(self, host: str) -> bool:
        """Whether a till connecting from ``host`` may be this device (the allow-list; empty allows any)."""
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class TillTcpDriver(Driver):
    config_model = TillTcpConfig
    price_role = "till"

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, TillTcpConfig)
        self.cfg = config
        self.device_id = config.id
        self.till_id = config.till_id or config.id
        self._conn: TillConnection | None = None
        self._connected = asyncio.Event()
        self._problem: str | None = None  # why a connected till is degraded (bad input, a timeout)
        self._aborts_pending: set[int] = set()
        self.connected_since: float | None = None
        self.reported_version: int | None = None
        self.staged_version: int | None = None
        self.protocol: int | None = None  # negotiated in HELLO, None while no till is connected
        self._sold_stale = False  # warned once per stretch of sales while stale, not per sale
        self.counts = {"sales": 0, "lookups": 0, "bad_input": 0, "connections": 0}

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        host, port = tp.parse_address(self.cfg.listen)
        listener = await TillListener.acquire(host, port)
        try:
            listener.register(self.till_id, self)
            self.ctx.set_health(Health.OFFLINE, f"waiting for till {self.till_id!r} to connect on port {port}")
            await asyncio.get_running_loop().create_future()  # connections arrive through attach()
        finally:
            listener.unregister(self.till_id, self)
            if self._conn is not None:
                self._conn.close("device stopped")
            await listener.release()

    def details(self) -> dict[str, Any]:
        return {
            "till_id": self.till_id, "listen": self.cfg.listen,
            "peer": self._conn.peer if self._conn else None,
            "connected_since": tp.iso_time(self.connected_since) if self._conn and self.connected_since else None,
            "reported_version": self.reported_version, "staged_version": self.staged_version,
            "protocol": self.protocol if self._conn else None, **self.counts,
        }

    def _refresh_health(self) -> None:
        if self._conn is None:
            self.ctx.set_health(Health.OFFLINE, "till disconnected" if self.counts["connections"] else None)
        elif self._problem:
            self.ctx.set_health(Health.DEGRADED, self._problem)
        else:
            self.ctx.set_health(Health.OK)

    # -- a till connects (called by the listener in the connection's task) -------------------------------------
    def admits(self, host: str) -> bool:
        return self.cfg.admits(host)

    async def attach(self, conn: TillConnection, hello: dict[str, Any]) -> None:
        rid = hello.get("id")
        if not self.cfg.admits(conn.host):
            raise tp.ProtocolError(tp.UNAUTHORIZED, "this till may not connect from this address", rid,
                                   log_detail="address not in allow")
        if self.cfg.secret is not None and not hmac.compare_digest(
            str(hello.get("secret", "")).encode(), self.cfg.secret.encode()
        ):
            raise tp.ProtocolError(tp.UNAUTHORIZED, "HELLO carries no valid secret for this till", rid,
                                   log_detail="wrong or missing secret")
        protocol = tp.negotiate(hello)
        self._note_versions(hello, rid)
        if self._conn is not None:
            log.warning("till %s reconnected from %s; dropping its old connection from %s", self.till_id,
                        conn.peer, self._conn.peer, extra={"device": self.device_id})
            self._conn.close("replaced by a new connection from the same till")
        self._conn, self._problem, self.protocol = conn, None, protocol
        self.connected_since = time.time()
        self.counts["connections"] += 1
        self._connected.set()
        log.info("till %s connected from %s (version %s, protocol %d)", self.till_id, conn.peer,
                 self.reported_version, protocol, extra={"device": self.device_id})
        reply = {"type": "OK", "re": rid, "store_id": self.ctx.store_id, "device": self.device_id,
                 "protocol": protocol, "gateway": GATEWAY_VERSION, "ping_s": self.cfg.ping_interval}
        stale = self._stale()
        if stale is not None:  # told at once: the audit brings the till up to date within `stale_check` seconds
            reply["stale"] = stale
        await conn.send(reply)
        self.ctx.seen()  # before the health change, so the retained OK state carries last_seen
        self._refresh_health()
        keeper = asyncio.create_task(self._keep_alive(conn), name=f"till-{self.device_id}-ping")
        try:
            await self._serve(conn)
        finally:
            keeper.cancel()
            conn.close("connection ended")
            if self._conn is conn:
                self._conn = None
                self.protocol = None
                self._connected.clear()
                log.info("till %s disconnected", self.till_id, extra={"device": self.device_id})
                self._refresh_health()

    async def _serve(self, conn: TillConnection) -> None:
        while True:
            msg: dict[str, Any] | None = None
            try:
                line = await tp.read_line(conn.reader)
                if line is None:
                    return
                conn.last_rx = asyncio.get_running_loop().time()
                self.ctx.seen()
                if not line.strip():
                    continue
                msg = tp.decode(line)
                if msg["type"] in ("OK", "ERROR"):
                    if not conn.resolve(msg):
                        log.info("till %s answered %s, which nobody waits for (late?)", self.till_id,
                                 loggable_id(msg.get("re")), extra={"device": self.device_id})
                    continue
                reply = await self._handle(msg)
            except tp.ProtocolError as err:
                await self._refuse(conn, msg, err)
                continue
            except (ConnectionError, OSError):
                raise
            except Exception as err:  # a bug here must cost one answer, never the till's connection
                log.error("till %s: handling %s failed: %s", self.till_id, loggable_id(msg and msg.get("type")),
                          exception_summary(err))
                await self._refuse(conn, msg, tp.ProtocolError(tp.INTERNAL, f"gateway error ({type(err).__name__})"))
                continue
            await conn.send({"type": "OK", "re": msg.get("id"), **reply})
            if self._problem and self._problem.startswith("bad input"):
                self._problem = None
                self._refresh_health()

    async def _refuse(self, conn: TillConnection, msg: dict[str, Any] | None, err: tp.ProtocolError) -> None:
        re = err.re if err.re is not None else (msg.get("id") if msg else None)
        tp.count_rejection(self.ctx, err.code)
        if err.code in BAD_INPUT_CODES:
            self.counts["bad_input"] += 1
            n = self.counts["bad_input"]
            if n <= 10 or n % 100 == 0:  # a till spewing garbage must not flood the journal
                log.warning("till %s sent bad input (%d so far): %s", self.till_id, n, err.loggable,
                            extra={"device": self.device_id})
            self._problem = f"bad input from till: {err.loggable}"
            self._refresh_health()
        await conn.send({"type": "ERROR", "re": re, "code": err.code, "error": str(err)})

    async def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind, rid = msg["type"], msg.get("id")
        if kind == "SALE":
            return await self._sale(msg, rid)
        if kind == "LOOKUP":
            return await self._lookup(msg, rid)
        if kind == "PING":
            return {}
        if kind == "HELLO":  # a till may repeat HELLO to report its versions
            self._note_versions(msg, rid)
            return {"store_id": self.ctx.store_id, "device": self.device_id, "protocol": self.protocol}
        raise tp.ProtocolError(tp.UNKNOWN_TYPE, f"unknown message type {safe_json.echo(kind, 32)}", rid)

    async def _sale(self, msg: dict[str, Any], rid: Any) -> dict[str, Any]:
        try:
            sale = tp.Sale.model_validate(msg.get("sale"))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "sale"
            known = ".".join(p if isinstance(p, str) and p in _SALE_FIELDS else str(p) if isinstance(p, int)
                             else "?" for p in first["loc"])
            raise tp.ProtocolError(tp.BAD_REQUEST, f"invalid sale: sale.{safe_json.echo(where, 80)[1:-1]}: "
                                   f"{first['msg']}" + (f" (+{err.error_count() - 1} more)"
                                                        if err.error_count() > 1 else ""),
                                   rid, log_detail=f"invalid sale: sale.{known}: {first['type']}") from None
        data = {"till_id": self.till_id, **sale.model_dump(exclude_none=True)}
        stale = bool(self._stale())
        if stale:
            # Never refused (the sale happened; refusing it would lose it), but head office sees it was rung up
            # with prices older than the store's.
            data["stale_prices"] = True
            if not self._sold_stale:
                log.warning("till %s sells while behind the price book (till version %s)", self.till_id,
                            self.reported_version, extra={"device": self.device_id})
        self._sold_stale = stale
        try:
            accepted = await self.ctx.emit("sale", data)
        except EventRejected as err:  # the sale itself can never be stored: retrying it unchanged cannot help
            raise tp.ProtocolError(tp.BAD_REQUEST, f"sale cannot be stored: {err}", rid,
                                   log_detail="sale cannot be stored") from None
        except Exception as err:  # outbox full, disk full: the till must keep the sale and send it again
            log.error("sale from till %s NOT stored: %s", self.till_id, err, extra={"device": self.device_id})
            raise tp.ProtocolError(tp.NOT_STORED, f"sale not stored, keep it and retry: {err}", rid) from None
        self.counts["sales"] += 1
        return {"event_id": accepted.id, "seq": accepted.seq}

    async def _lookup(self, msg: dict[str, Any], rid: Any) -> dict[str, Any]:
        sku = msg.get("sku")
        if not isinstance(sku, str) or not 1 <= len(sku) <= 64:
            raise tp.ProtocolError(tp.BAD_REQUEST, "LOOKUP needs a string 'sku' of 1..64 characters", rid,
                                   log_detail="bad sku")
        book = self.ctx.prices
        if book is None:
            raise tp.ProtocolError(tp.NO_PRICE_BOOK, "no price book", rid)
        item = await book.alookup(sku)  # reads SQLite off the event loop
        self.counts["lookups"] += 1
        if item is None:
            raise tp.ProtocolError(tp.NOT_FOUND, f"no price for sku {safe_json.echo(sku)}", rid)
        reply: dict[str, Any] = {"item": item}
        stale = self._stale()
        if stale is not None:
            reply["stale"] = stale
        return reply

    def _stale(self) -> bool | None:
        """Behind the active price version, so the till must not sell yet; None without a price book that knows.
        A till that reports an older version than the book is stale from its HELLO on, before the audit notices."""
        book = self.ctx.prices
        if book is None:
            return None
        # the version this till should run now: the book's, or an older one while its COMMIT is held back
        expected = book.version_for(self.device_id)
        behind = expected > 0 and (self.reported_version or 0) < expected
        return book.is_stale(self.device_id) or behind

    def _note_versions(self, msg: dict[str, Any], rid: Any) -> None:
        for key in ("version", "staged"):
            value = msg.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise tp.ProtocolError(tp.BAD_REQUEST, f"'{key}' must be a non-negative integer or null", rid,
                                       log_detail=f"bad {key}")
        if "version" in msg:
            self.reported_version = msg["version"]
        if "staged" in msg:
            self.staged_version = msg["staged"]

    async def _keep_alive(self, conn: TillConnection) -> None:
        """Deliver aborts decided while the till was away, then PING it whenever it has been quiet a while."""
        loop = asyncio.get_running_loop()
        for v in sorted(self._aborts_pending):
            try:
                await conn.request({"type": "ABORT", "version": v}, self.cfg.request_timeout)
                self._aborts_pending.discard(v)
            except (TimeoutError, ConnectionError, TillRejected) as err:
                log.warning("till %s: deferred ABORT %d failed: %s", self.till_id, v, err)
        while not conn.closed.is_set():
            idle = loop.time() - conn.last_rx
            if idle < self.cfg.ping_interval:
                await asyncio.sleep(self.cfg.ping_interval - idle)
                continue
            try:
                await conn.request({"type": "PING"}, self.cfg.request_timeout)
            except TillRejected:
                pass  # it answered: alive
            except (TimeoutError, ConnectionError) as err:
                log.warning("till %s is silent (%s); closing its connection", self.till_id, err,
                            extra={"device": self.device_id})
                conn.close("till did not answer PING")
                return

    # -- requests to the till ----------------------------------------------------------------------------------
    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._conn is None:
            try:
                async with asyncio.timeout(self.cfg.request_timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise ConnectionError(f"till {self.till_id!r} is not connected") from None
        assert self._conn is not None
        try:
            reply = await self._conn.request(message, self.cfg.request_timeout)
        except TimeoutError as err:
            self._problem = f"{err}"
            self._refresh_health()
            raise
        if self._problem and self._problem.startswith("till did not answer"):
            self._problem = None
            self._refresh_health()
        return reply

    @property
    def price_can_hold(self) -> bool | None:
        return None if self._conn is None or self.protocol is None else self.protocol >= tp.HOLDS_SINCE

    async def price_prepare(self, change: PriceChange) -> None:
        try:
            # each part's wire form built when it is sent: one part in memory, not the whole book per till
            for message in tp.prepare_messages(change, bool(self.price_can_hold), self.cfg.prepare_chunk):
                await self._request(message)
        except TillRejected as err:
            raise PrepareFailed(f"till {self.till_id} refused version {change.version}: {err}") from None
        except (TimeoutError, ConnectionError) as err:
            raise PrepareFailed(f"till {self.till_id} could not stage version {change.version}: {err}") from None
        self.staged_version = change.version

    async def price_commit(self, version: int) -> None:
        """Raises ConnectionError/TimeoutError/TillRejected when the till has not switched; safe to repeat."""
        reply = await self._request({"type": "COMMIT", "version": version})
        got = reply.get("version", version)
        self.reported_version = got if isinstance(got, int) else version
        if self.staged_version == version:
            self.staged_version = None

    async def price_hold(self, version: int) -> None:
        """HOLD: the till charges at most the staged version's transition prices. Raises like price_commit."""
        await self._request({"type": "HOLD", "version": version})

    async def price_final(self, version: int, keep: list[str]) -> None:
        """FINAL: the labels show the outcome of `version`; its holds end except for `keep`."""
        await self._request({"type": "FINAL", "version": version, "keep": keep})

    async def price_abort(self, version: int) -> None:
        """A till that is away cannot charge a staged version; the ABORT is sent when it reconnects."""
        if self.staged_version == version:
            self.staged_version = None
        if self._conn is None:
            self._aborts_pending.add(version)
            log.info("till %s is not connected; ABORT %d will be sent when it is", self.till_id, version)
            return
        await self._request({"type": "ABORT", "version": version})

    async def price_confirmed(self, version: int) -> bool:
        return self.reported_version == version

    async def price_reported_version(self) -> int | None:
        if self._conn is not None:
            try:
                reply = await self._conn.request({"type": "VERSION"}, self.cfg.request_timeout)
                self._note_versions(reply, None)
            except (TimeoutError, ConnectionError, TillRejected, tp.ProtocolError) as err:
                log.info("till %s: VERSION failed (%s); using the last reported version", self.till_id, err)
        return self.reported_version
