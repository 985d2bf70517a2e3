"""`storelink demo` part: a simulated till (device `till-1`) that posts a sale every few seconds and looks up a
price, so a sale can be watched flowing to head office, and a `plu_file` device writing price files for a POS
into the demo's work directory (`pos-import/`) whenever the price part rolls out a change.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from storelink.drivers import till_protocol as tp
from storelink.drivers.sim.till import TillSimulator, run_till

DEMO_SKUS = ["1001", "1002", "1003", "4006381333931"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    (workdir / "pos-import").mkdir(exist_ok=True)
    cfg.setdefault("devices", []).extend([
        {"id": "till-1", "driver": "till_tcp", "listen": f"127.0.0.1:{_free_port()}", "till_id": "1"},
        {"id": "pos-prices", "driver": "plu_file", "directory": str(workdir / "pos-import")},
    ])


async def run(gateway: Any) -> None:
    dev = next(d for d in gateway.config.device_configs if d.id == "till-1")
    host, port = tp.parse_address(dev.listen)
    for _ in range(50):  # the driver opens the till port just after the gateway is ready
        if "waiting for till" in (gateway.supervisor.devices["till-1"].last_error or ""):
            break
        await asyncio.sleep(0.1)
    await run_till(TillSimulator(host, port, "1", version=0), 4.0, DEMO_SKUS, lambda line: print(line, flush=True))

