"""A till simulator speaking the StoreLink till protocol: for tests, ``storelink demo``, and for POS vendors to
try their integration against (``python -m storelink.drivers.sim.till --connect 127.0.0.1:7700 --till-id 1``).

It connects, says HELLO with its price version, sends sales and lookups, and answers the gateway's PREPARE /
HOLD / COMMIT / FINAL / ABORT / VERSION / PING like a real till with its own price table: prices are staged per
version and switched on COMMIT, and `charge(sku)` is what it would ring up now (its table, capped by the holds of
every version still in transition). `protocol=1` makes it an older till that knows neither HOLD nor FINAL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from storelink.drivers import till_protocol as tp

log = logging.getLogger(__name__)


class TillSimulator:
    def __init__(self, host: str, port: int, till_id: str, *, secret: str | None = None, version: int | None = None,
                 answer_gateway: bool = True, refuse_prepare: str | None = None, protocol: int = tp.PROTOCOL_VERSION):
        self.host, self.port, self.till_id, self.secret = host, port, till_id, secret
        self.protocol = protocol
        self.version = version  # the price version this till charges with
        self.answer_gateway = answer_gateway  # False: a till that hangs (tests of the gateway's timeouts)
        self.refuse_prepare = refuse_prepare  # an error text: refuse every PREPARE with it
        self.refuse_commits = 0  # refuse this many COMMITs to come (a till busy with a sale), then take them
        self.prices: dict[str, dict[str, Any]] = {}
        self.staged: dict[int, list[dict[str, Any]]] = {}
        self.holds: dict[int, dict[str, int]] = {}  # version -> sku -> at most this much while labels change
        self.on_change: list[Callable[[TillSimulator], None]] = []  # after every gateway message (charge() may move)
        self.received: list[dict[str, Any]] = []  # every request the gateway sent
        self.hello_reply: dict[str, Any] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    # -- connection -------------------------------------------------------------------------------------------
    async def connect(self) -> dict[str, Any]:
        """Connect and say HELLO; returns the gateway's reply (TillError when it refuses)."""
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=16 * 1024 * 1024)
        self.closed.clear()
        self._task = asyncio.create_task(self._read_loop(), name=f"till-sim-{self.till_id}")
        hello: dict[str, Any] = {"type": "HELLO", "till_id": self.till_id, "protocol": self.protocol,
                                 "version": self.version, "staged": max(self.staged, default=None)}
        if self.secret:
            hello["secret"] = self.secret
        self.hello_reply = await self.request(hello)
        return self.hello_reply

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.closed.set()

    async def send_raw(self, data: bytes) -> None:
        assert self._writer is not None, "not connected"
        self._writer.write(data)
        await self._writer.drain()

    async def request(self, message: dict[str, Any], timeout: float = 10.0, raise_error: bool = True) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send_raw(tp.encode({**message, "id": rid}))
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(rid, None)
        if raise_error and reply.get("type") == "ERROR":
            raise TillError(reply)
        return reply

    async def sale(self, sale: dict[str, Any]) -> dict[str, Any]:
        return await self.request({"type": "SALE", "sale": sale})

    async def lookup(self, sku: str) -> dict[str, Any]:
        return await self.request({"type": "LOOKUP", "sku": sku}, raise_error=False)

    async def next_reply(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next reply with no request of ours behind it (an answer to raw bytes sent with send_raw)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[-1] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pending.pop(-1, None)

    # -- the gateway's side -------------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while (line := await self._reader.readline()):
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("gateway sent a line that is not JSON: %r", line[:80])
                    continue
                if msg.get("type") in ("OK", "ERROR"):
                    fut = self._pending.get(msg.get("re")) if isinstance(msg.get("re"), int) else None
                    fut = fut or self._pending.get(-1)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    continue
                self.received.append(msg)
                if self.answer_gateway:
                    answer = self._answer(msg)
                    for callback in self.on_change:
                        callback(self)
                    await self.send_raw(tp.encode({"re": msg.get("id"), **answer}))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("gateway closed the connection"))

    def charge(self, sku: str) -> int | None:
        """What this till rings up for `sku` now (None: it does not sell it): its own table, at most every hold."""
        item = self.prices.get(sku)
        if item is None:
            return None
        return min([int(item["price"])] + [h[sku] for h in self.holds.values() if sku in h])

    def _hold(self, v: int) -> None:
        caps = {i["sku"]: int(i["transition_price"]) for i in self.staged.get(v, [])
                if i.get("transition_price") is not None}
        if caps and v not in self.holds:
            self.holds[v] = caps

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind, v = msg.get("type"), msg.get("version")
        if kind == "PING":
            return {"type": "OK"}
        if kind == "VERSION":
            return {"type": "OK", "version": self.version, "staged": max(self.staged, default=None),
                    **({"holding": sorted(self.holds)} if self.protocol >= tp.HOLDS_SINCE else {})}
        if kind in ("HOLD", "FINAL") and self.protocol < tp.HOLDS_SINCE:
            return {"type": "ERROR", "code": tp.UNKNOWN_TYPE, "error": f"unknown type {kind!r}"}
        if not isinstance(v, int):
            return {"type": "ERROR", "code": tp.BAD_REQUEST if kind else tp.UNKNOWN_TYPE, "error": "no version"}
        if kind == "PREPARE":
            if self.refuse_prepare:
                return {"type": "ERROR", "code": "refused", "error": self.refuse_prepare}
            if msg.get("part") == 1:
                self.staged[v] = []
            self.staged.setdefault(v, []).extend(msg.get("items") or [])
            return {"type": "OK", "version": v}
        if kind == "HOLD":
            if v not in self.staged and v not in self.holds:
                return {"type": "ERROR", "code": tp.NOT_STAGED, "error": f"version {v} is not staged"}
            self._hold(v)
            return {"type": "OK", "version": v}
        if kind == "COMMIT":
            if self.refuse_commits > 0:
                self.refuse_commits -= 1
                return {"type": "ERROR", "code": "busy", "error": "a sale is open; try again"}
            if v == self.version and v not in self.staged:
                return {"type": "OK", "version": v}  # repeated COMMIT: already on it
            if v not in self.staged:
                return {"type": "ERROR", "code": tp.NOT_STAGED, "error": f"version {v} is not staged"}
            if self.protocol >= tp.HOLDS_SINCE:
                self._hold(v)  # the holds go on with the new prices, never after them
            for item in self.staged.pop(v):
                self.prices[item["sku"]] = item
            self.version = v
            return {"type": "OK", "version": v}
        if kind == "FINAL":
            keep = set(msg.get("keep") or [])
            left = {sku: p for sku, p in self.holds.get(v, {}).items() if sku in keep}
            if left:
                self.holds[v] = left
            else:
                self.holds.pop(v, None)
            return {"type": "OK", "version": v}
        if kind == "ABORT":
            self.staged.pop(v, None)  # holds of v stay until FINAL v: the labels may still show v
            return {"type": "OK"}
        return {"type": "ERROR", "code": tp.UNKNOWN_TYPE, "error": f"unknown type {kind!r}"}


class TillError(Exception):
    def __init__(self, reply: dict[str, Any]):
        super().__init__(f"{reply.get('code')}: {reply.get('error')}")
        self.reply = reply
        self.code = reply.get("code")


_receipts = itertools.count(1)


def make_sale(till_id: str, price_version: int | None = None, lines: int = 2) -> dict[str, Any]:
    """A plausible sale (anonymous: no customer data, tender type only)."""
    items: list[dict[str, Any]] = [
        {"sku": f"{4006381333900 + random.randint(0, 99)}", "qty": random.choice([1, 1, 2]),
         "price": random.choice([99, 149, 249, 499, 1299])} for _ in range(lines)]
    total = sum(int(i["qty"]) * int(i["price"]) for i in items)
    return {"sale_id": f"T{till_id}-{int(time.time())}-{next(_receipts):05d}",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "currency": "EUR", "total": total,
            "price_version": price_version, "lines": items, "payments": [{"tender": "card", "amount": total}]}


async def run_till(sim: TillSimulator, every: float, skus: list[str], say: Any = print) -> None:
    """Keep connected (reconnecting with backoff), post a sale and do a lookup every `every` seconds."""
    delay = 0.5
    while True:
        try:
            await sim.connect()
            say(f"[till {sim.till_id}] connected to {sim.host}:{sim.port}")
            delay = 0.5
            while not sim.closed.is_set():
                sale = make_sale(sim.till_id, sim.version)
                reply = await sim.sale(sale)
                say(f"[till {sim.till_id}] SALE {sale['sale_id']} {sale['total'] / 100:.2f} EUR -> stored "
                    f"(seq {reply.get('seq')})")
                if skus:
                    sku = random.choice(skus)
                    res = await sim.lookup(sku)
                    text = json.dumps(res["item"]) if res["type"] == "OK" else f"{res['code']}: {res['error']}"
                    say(f"[till {sim.till_id}] LOOKUP {sku} -> {text}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):
                        await sim.closed.wait()
        except (OSError, ConnectionError, TimeoutError, TillError) as err:
            say(f"[till {sim.till_id}] {type(err).__name__}: {err}; retrying in {delay:.1f} s")
        await sim.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connect", default=f"127.0.0.1:{tp.DEFAULT_PORT}", help="gateway till port (HOST:PORT)")
    p.add_argument("--till-id", default="1")
    p.add_argument("--secret", default=None)
    p.add_argument("--every", type=float, default=5.0, help="seconds between sales")
    p.add_argument("--lookup", action="append", default=[], help="a SKU to look up after each sale (repeatable)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    host, port = tp.parse_address(args.connect, default_host="127.0.0.1")
    sim = TillSimulator(host, port, args.till_id, secret=args.secret, version=0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_till(sim, args.every, args.lookup))


if __name__ == "__main__":
    main()
