"""Outbox benchmark: durable enqueue rate, drain rate vs raw paho, idle RSS of `storelink run`.

    .venv/bin/python bench/outbox.py [--events 50000] [--runs 3]

Starts its own Mosquitto on a free port. Every figure is the median of --runs; the drain rate is also printed as a
ratio against raw paho-mqtt publishing the same payloads at QoS 1, with the same in-flight window, to the same
broker in the same run (targets: enqueue >= 20,000 events/s durable, drain ratio >= 0.5, idle RSS <= 60 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storelink.config import MqttConfig, StorageConfig
from storelink.outbox import Outbox
from storelink.uplink import Uplink
from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for, write_config

WINDOW = 200
DATA = {"till": "till-1", "basket": [{"sku": f"SKU{i}", "qty": 1, "price": 199} for i in range(3)]}


async def enqueue_rate(workdir: Path, events: int, producers: int, per_call: int) -> float:
    ob = Outbox(StorageConfig(path=workdir / f"enq-{producers}-{per_call}.db"))
    await asyncio.to_thread(ob.open)
    calls = events // per_call

    async def producer(n: int) -> None:
        for _ in range(n):
            if per_call == 1:
                await ob.put("sale", "till-1", DATA)
            else:
                await ob.put_many([("sale", "till-1", DATA)] * per_call)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(calls // producers) for _ in range(producers)))
    elapsed = time.perf_counter() - t0
    done = ob.stats.accepted_total
    await asyncio.to_thread(ob.close)
    return done / elapsed


async def drain_rate(workdir: Path, port: int, events: int) -> float:
    ob = Outbox(StorageConfig(path=workdir / "drain.db"))
    await asyncio.to_thread(ob.open)
    for _ in range(events // 1000):
        await ob.put_many([("sale", "till-1", DATA)] * 1000)
    up = Uplink(MqttConfig(port=port, max_inflight=WINDOW, client_id=f"bench-{time.monotonic_ns()}"),  # type: ignore[call-arg]
                "bench", ob)
    t0 = time.perf_counter()
    task = asyncio.create_task(up.run())
    while ob.stats.depth > 0:
        await asyncio.sleep(0.01)
        if time.perf_counter() - t0 > 300:
            raise RuntimeError(f"drain stalled: {ob.stats.depth} left, uplink {up.status()}")
    elapsed = time.perf_counter() - t0
    await up.stop(task)
    await asyncio.to_thread(ob.close)
    return events / elapsed


def raw_paho_rate(port: int, events: int, payload: bytes) -> float:
    done = threading.Event()
    acked = [0]

    def on_publish(*_a: object) -> None:
        acked[0] += 1
        if acked[0] == events:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(WINDOW)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    sent = 0
    while sent < events:  # bound our own queue like the uplink does (paho silently drops past 65,535)
        if sent - acked[0] < 5000:
            c.publish("storelink/bench/events/sale", payload, qos=1)
            sent += 1
        else:
            time.sleep(0.0005)
    if not done.wait(300):
        raise RuntimeError(f"raw paho stalled: {acked[0]} of {events} acknowledged")
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return events / elapsed


def idle_rss_mb(workdir: Path, port: int) -> float:
    cfg = write_config(workdir / "rss.toml", "store-bench", port, free_port())
    gw = GatewayProcess(cfg, int(cfg.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])).start()
    time.sleep(5)
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    gw.terminate()
    return rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work).start()
        try:
            payload = b'{"id":"0123456789abcdef0123456789abcdef","seq":1,"ts":"2026-01-01T00:00:00.000Z",' \
                      b'"kind":"sale","device":"till-1","data":' + str(DATA).encode() + b"}"
            res: dict[str, list[float]] = {k: [] for k in ("single", "batch", "drain", "raw", "ratio")}
            for run in range(args.runs):
                d = work / f"run{run}"
                d.mkdir()
                res["single"].append(asyncio.run(enqueue_rate(d, args.events, 256, 1)))
                res["batch"].append(asyncio.run(enqueue_rate(d, args.events, 8, 100)))
                res["raw"].append(raw_paho_rate(broker.port, args.events, payload))
                res["drain"].append(asyncio.run(drain_rate(d, broker.port, args.events)))
                res["ratio"].append(res["drain"][-1] / res["raw"][-1])
                print(f"run {run + 1}/{args.runs}:", {k: round(v[-1], 2) for k, v in res.items()}, file=sys.stderr)
                wait_for(lambda: True, 0.1)
            rss = idle_rss_mb(work, broker.port)
        finally:
            broker.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"outbox benchmark, {args.events} events x {args.runs} runs (medians), sync=FULL, window {WINDOW}")
    print(f"  durable enqueue, 256 concurrent single puts : {med['single']:>10,.0f} events/s   (target >= 20,000)")
    print(f"  durable enqueue, 8 producers x 100 per call : {med['batch']:>10,.0f} events/s")
    print(f"  drain outbox -> mosquitto QoS 1, PUBACK+delete: {med['drain']:>8,.0f} events/s")
    print(f"  raw paho QoS 1, same broker, same window    : {med['raw']:>10,.0f} msg/s")
    print(f"  drain / raw paho ratio                      : {med['ratio']:>10.2f}   (target >= 0.5)")
    print(f"  idle RSS of storelink run                   : {rss:>10.1f} MB   (target <= 60)")
    print("  all runs:", {k: [round(x, 2) for x in v] for k, v in res.items()})


if __name__ == "__main__":
    main()
