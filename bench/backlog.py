"""Costs that stay flat: the outbox with nothing waiting and with a 1,000,000-event backlog, side by side.

    .venv/bin/python bench/backlog.py [--backlog 1000000] [--events 30000] [--runs 3]

A store offline for a long weekend: the backlog is built once through Outbox.put_many (60 % sales, 40 %
telemetry, the bench/outbox.py payload) and copied for every run. With an empty outbox and with the backlog:

- durable enqueue rate: 256 concurrent single puts (bench/outbox.py's figure), --events events;
- drain rate: the Uplink publishing --events events at QoS 1 to a local Mosquitto (PUBACK + delete), from the
  head of the backlog (or, for "empty", of an outbox holding just those events);
- status API latency: median and 99th percentile of GET /api/v1/status on a real `storelink run` (its broker
  down, so nothing drains meanwhile), and that process's RSS (VmRSS) and start-up time;
- the cap at that size: an outbox at max_events = backlog takes 2,000 telemetry and 500 sales one at a time:
  every one accepted, the oldest telemetry evicted, depth unchanged; the put rate there.

Each figure is the median of --runs; the ratio backlog / empty is printed beside it (target: within 20 %).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.outbox import DATA, WINDOW
from storelink.config import MqttConfig, StorageConfig
from storelink.outbox import Outbox
from storelink.uplink import Uplink
from tests.helpers import GatewayProcess, Mosquitto, free_port

BIG = {"max_events": 5_000_000, "max_bytes": 4 * 1024**3}  # the cap out of the way, except in the cap figure
TELEMETRY = {"cpu": 0.31, "temp_c": 48.2, "mem_free_mb": 212, "uptime_s": 86400}


async def _open(path: Path, **storage: Any) -> Outbox:
    ob = Outbox(StorageConfig(path=path, **storage))
    await asyncio.to_thread(ob.open)
    return ob


async def build(path: Path, n: int) -> float:
    ob = await _open(path, **BIG)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        await ob.put_many([("sale", "till-1", DATA) if (i + k) % 5 < 3 else ("telemetry", "pi", TELEMETRY)
                           for k in range(min(1000, n - i))])
    elapsed = time.perf_counter() - t0
    await asyncio.to_thread(ob.close)
    return elapsed


async def enqueue_rate(path: Path, events: int) -> float:
    ob = await _open(path, **BIG)
    before = ob.stats.accepted_total

    async def producer(k: int) -> None:
        for _ in range(k):
            await ob.put("sale", "till-1", DATA)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(events // 256) for _ in range(256)))
    rate = (ob.stats.accepted_total - before) / (time.perf_counter() - t0)
    await asyncio.to_thread(ob.close)
    return rate


async def drain_rate(path: Path, port: int, events: int, fill: bool) -> float:
    ob = await _open(path, **BIG)
    if fill:
        for _ in range(events // 1000):
            await ob.put_many([("sale", "till-1", DATA)] * 1000)
    acked = [0]
    ack = ob.ack

    def counting_ack(seqs: Any) -> None:  # PUBACKs as they come (the deletes themselves are lazy)
        acked[0] += len(seqs)
        ack(seqs)

    ob.ack = counting_ack  # type: ignore[method-assign]
    up = Uplink(MqttConfig(port=port, max_inflight=WINDOW, client_id=f"bench-{time.monotonic_ns()}"),  # type: ignore[call-arg]
                "bench", ob)
    task = asyncio.create_task(up.run())
    t0 = time.perf_counter()
    while not up.connected:
        await asyncio.sleep(0.001)
        if time.perf_counter() - t0 > 30:
            raise RuntimeError(f"uplink did not connect: {up.status()}")
    t0 = time.perf_counter()
    while acked[0] < events:
        await asyncio.sleep(0.005)
        if time.perf_counter() - t0 > 300:
            raise RuntimeError(f"drain stalled at {acked[0]} of {events}: {up.status()}")
    rate = acked[0] / (time.perf_counter() - t0)
    await up.stop(task)
    await asyncio.to_thread(ob.close)
    return rate


def status_and_rss(work: Path, db: Path) -> dict[str, float]:
    http_port = free_port()
    cfg = work / "status.toml"
    cfg.write_text(f'store_id = "bench"\n[mqtt]\nport = {free_port()}\n'  # nobody listens: nothing drains
                   f'[storage]\npath = "{db}"\nmax_events = {BIG["max_events"]}\nmax_bytes = {BIG["max_bytes"]}\n'
                   f'[http]\nlisten = "127.0.0.1:{http_port}"\n')
    t0 = time.perf_counter()
    gw = GatewayProcess(cfg, http_port).start()
    started = time.perf_counter() - t0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        lat = []
        for _ in range(300):
            t = time.perf_counter()
            conn.request("GET", "/api/v1/status")
            conn.getresponse().read()
            lat.append(time.perf_counter() - t)
        conn.close()
        time.sleep(2)
        assert gw.proc is not None
        status = Path(f"/proc/{gw.proc.pid}/status").read_text()
        rss = int(next(x.split()[1] for x in status.splitlines() if x.startswith("VmRSS:"))) / 1024
        lat.sort()
        return {"status_ms": statistics.median(lat) * 1000, "status_p99_ms": lat[int(len(lat) * 0.99)] * 1000,
                "rss_mb": rss, "start_s": started}
    finally:
        gw.terminate()


async def at_the_cap(path: Path, size: int) -> dict[str, float]:
    ob = await _open(path, max_events=size, max_bytes=BIG["max_bytes"])
    depth0, t0 = ob.stats.depth, time.perf_counter()
    for i in range(2500):
        await (ob.put("telemetry", "pi", TELEMETRY) if i % 5 else ob.put("sale", "till-1", DATA))
    rate = 2500 / (time.perf_counter() - t0)
    s = ob.status()
    await asyncio.to_thread(ob.close)
    ok = s["depth"] == depth0 == size and s["evicted_total"] == 2500 and s["refused_total"] == 0
    if not ok:
        raise RuntimeError(f"the cap did not hold: {s}")
    return {"cap_put_rate": rate}


def one_run(work: Path, template: Path | None, broker: Mosquitto, events: int, backlog: int) -> dict[str, float]:
    out: dict[str, float] = {}

    def fresh(name: str) -> Path:
        db = work / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        if template is not None:
            shutil.copyfile(template, db)
            # On disk, not dirty in the page cache: else the first checkpoint's fsync writes out the whole copy
            # (a bench artefact; a store's backlog was written over days).
            fd = os.open(db, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return db

    out["enqueue"] = asyncio.run(enqueue_rate(fresh("enq"), events))
    out["drain"] = asyncio.run(drain_rate(fresh("drain"), broker.port, events, fill=template is None))
    out |= status_and_rss(work, fresh("status"))
    cap_db = fresh("cap")
    if template is None:  # "empty" here: a small outbox at its own cap
        asyncio.run(build(cap_db, 2500))
    out |= asyncio.run(at_the_cap(cap_db, backlog if template is not None else 2500))
    for name in ("enq", "drain", "status", "cap"):
        fresh(name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {"empty": [], "backlog": []}
    with tempfile.TemporaryDirectory(prefix="bench-backlog-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        template = work / "backlog-template.db"
        took = asyncio.run(build(template, args.backlog))
        size_mb = template.stat().st_size / 1e6
        print(f"backlog of {args.backlog:,} events built in {took:.0f} s ({size_mb:.0f} MB)", file=sys.stderr)
        broker = Mosquitto(work).start()
        try:
            for r in range(args.runs):
                for name, tpl in (("empty", None), ("backlog", template)):
                    results[name].append(one_run(work, tpl, broker, args.events, args.backlog))
                    print(f"run {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    e, b = med["empty"], med["backlog"]
    print(f"\noutbox with 0 and with {args.backlog:,} events waiting ({size_mb:.0f} MB), median of {args.runs}")
    print(f"  {'':44} {'empty':>10} {'backlog':>10} {'ratio':>7}")
    rows = [("durable enqueue, 256 concurrent single puts/s", "enqueue", "{:10,.0f}"),
            ("drain to mosquitto, PUBACK + delete, events/s", "drain", "{:10,.0f}"),
            ("GET /api/v1/status, median ms", "status_ms", "{:10.2f}"),
            ("GET /api/v1/status, p99 ms", "status_p99_ms", "{:10.2f}"),
            ("RSS of storelink run, MB", "rss_mb", "{:10.1f}"),
            ("start-up of storelink run (to HTTP up), s", "start_s", "{:10.2f}"),
            ("puts/s at the cap (each evicts telemetry)", "cap_put_rate", "{:10,.0f}")]
    for label, key, fmt in rows:
        print(f"  {label:44} {fmt.format(e[key])} {fmt.format(b[key])} {b[key] / e[key]:7.2f}")
    print("  (cap: depth stayed at max_events, 2,500 puts accepted, 2,500 oldest telemetry evicted, 0 refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
