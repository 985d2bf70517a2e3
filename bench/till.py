"""Till benchmark: how long a till waits for the OK to a SALE (which means "durable in the outbox").

    .venv/bin/python bench/till.py [--sales 300] [--tills 4] [--runs 3]

- baseline: `outbox.put("sale", ...)` called directly, one at a time (the durable commit alone);
- one till: SALE -> OK round trips over TCP through the till_tcp driver, one at a time (ratio = till / baseline);
- N tills: N simulated tills selling at once (group commit shares the fsyncs): sales/s and latency.
storage.synchronous = FULL (the default: durable across power loss). No broker is needed: the outbox accepts
while the uplink is offline. Every figure is the median of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storelink.app import Gateway
from storelink.config import parse_config
from storelink.drivers.sim.till import TillSimulator, make_sale
from tests.helpers import free_port


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


async def one_run(sales: int, tills: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg: dict[str, Any] = {
            "store_id": "bench", "mqtt": {"port": free_port(), "reconnect_min": 5, "reconnect_max": 5},
            "storage": {"path": str(Path(tmp) / "gw.db")}, "http": {"listen": f"127.0.0.1:{free_port()}"},
            "devices": [{"id": f"till-{t}", "driver": "till_tcp", "listen": f"127.0.0.1:{port}", "till_id": str(t)}
                        for t in range(tills)],
        }
        gw = Gateway(parse_config(cfg, "<bench>"))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        await gw.ready.wait()
        await asyncio.sleep(0.3)  # the drivers open the till port
        base: list[float] = []
        for _ in range(sales):
            t0 = time.perf_counter()
            await gw.outbox.put("sale", "till-0", make_sale("0"))
            base.append(time.perf_counter() - t0)
        sims = [TillSimulator("127.0.0.1", port, str(t)) for t in range(tills)]
        for sim in sims:
            await sim.connect()
        single: list[float] = []
        for _ in range(sales):
            t0 = time.perf_counter()
            await sims[0].sale(make_sale("0"))
            single.append(time.perf_counter() - t0)
        many: list[float] = []

        async def till(sim: TillSimulator) -> None:
            for _ in range(sales // tills):
                t0 = time.perf_counter()
                await sim.sale(make_sale(sim.till_id))
                many.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(till(s) for s in sims))
        wall = time.perf_counter() - t0
        for sim in sims:
            await sim.close()
        stop.set()
        await task
    return {
        "base_p50": pct(base, 0.5), "base_p99": pct(base, 0.99),
        "till_p50": pct(single, 0.5), "till_p99": pct(single, 0.99),
        "many_p50": pct(many, 0.5), "many_p99": pct(many, 0.99), "many_rate": len(many) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sales", type=int, default=300)
    ap.add_argument("--tills", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = [asyncio.run(one_run(args.sales, args.tills)) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"baseline outbox.put (FULL):   p50 {med['base_p50']:.2f} ms  p99 {med['base_p99']:.2f} ms")
    print(f"one till SALE -> OK:          p50 {med['till_p50']:.2f} ms  p99 {med['till_p99']:.2f} ms  "
          f"(ratio p50 till/baseline {med['till_p50'] / med['base_p50']:.2f})")
    print(f"{args.tills} tills at once:              p50 {med['many_p50']:.2f} ms  p99 {med['many_p99']:.2f} ms  "
          f"{med['many_rate']:.0f} sales/s")
    print(f"(median of {args.runs} runs, {args.sales} sales each)")


if __name__ == "__main__":
    main()
