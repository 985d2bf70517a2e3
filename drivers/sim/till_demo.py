"""`storelink demo` part: a simulated till (device `till-1`) on the real till protocol, and a `plu_file` device
writing price files for a POS into the demo's work directory (`pos-import/`) whenever a price change rolls out.

The till stays connected (reconnecting like a real one when the gateway restarts); the story rings up sales and
looks up prices through it (`sell`, `lookup`), so what the console shows is what a till would get.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

from storelink.drivers import till_protocol as tp
from storelink.drivers.sim.till import TillError, TillSimulator, make_sale

_till: dict[str, TillSimulator] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    (workdir / "pos-import").mkdir(exist_ok=True)
    listen = f"127.0.0.1:{_free_port()}"
    cfg.setdefault("devices", []).extend([
        {"id": "till-1", "driver": "till_tcp", "listen": listen, "till_id": "1", "secret": "demo-till-secret"},
        {"id": "pos-prices", "driver": "plu_file", "directory": str(workdir / "pos-import")},
    ])
    host, port = tp.parse_address(listen)
    _till["till"] = TillSimulator(host, port, "1", secret="demo-till-secret", version=0)


def till() -> TillSimulator:
    return _till["till"]


async def connected(timeout: float = 20.0) -> TillSimulator:
    sim = till()
    async with asyncio.timeout(timeout):
        while sim.hello_reply is None or sim.closed.is_set():
            await asyncio.sleep(0.05)
    return sim


async def sell(lines: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ring up one sale; returns (the sale, the gateway's reply: stored with its seq)."""
    sim = await connected()
    sale = make_sale(sim.till_id, sim.version, lines)
    return sale, await sim.sale(sale)


async def lookup(sku: str) -> dict[str, Any] | None:
    """What the gateway tells the till to charge for `sku` (None: not in the price book)."""
    reply = await (await connected()).lookup(sku)
    return reply.get("item") if reply.get("type") == "OK" else None


async def run(_gateway: Any) -> None:
    sim = till()
    while True:  # a till that reconnects whenever the connection drops, as a real one would
        with contextlib.suppress(OSError, ConnectionError, TimeoutError, TillError):
            await sim.connect()
            await sim.closed.wait()
        await sim.close()
        sim.hello_reply = None
        await asyncio.sleep(0.5)
