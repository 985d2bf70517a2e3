"""Scanner benchmark: from the byte written on a pty to the scan event at a head-office subscriber.

    .venv/bin/python bench/scanner.py [--rate 50] [--seconds 10] [--burst 2000] [--runs 3]

Starts its own Mosquitto and a real gateway (`storelink run`, a subprocess, storage.synchronous = FULL) with a
`serial_scanner` on a pty. Per run:

- baseline: a bare paho client publishes the same kind of payload at QoS 1 at the same rate to the same broker;
  latency from publish() to the subscriber (what MQTT alone costs here);
- paced: GTIN-13 scans written to the pty at --rate scans/s; latency from os.write() on the pty master to the
  subscriber's on_message, through pyserial, the framer, biip, the durable outbox and the uplink;
- burst: --burst scans written as fast as the pty takes them; scans/s delivered to the subscriber, against the
  bare paho client publishing the same number as fast as it can.

Target: p99 <= 50 ms at 50 scans/s. Every figure is the median over --runs. The maximum is the first message
on each fresh connection (about 40 ms for the bare paho client too: TCP delayed ACK), see gw_max_at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from biip.checksums import gs1_standard_check_digit
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for, write_config

STORE = "bench-store"


def gtin(i: int) -> str:
    payload = f"200{i:09d}"
    return payload + str(gs1_standard_check_digit(payload))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


class Receiver:
    """Head office: records when each scan (keyed by its code) arrives."""

    def __init__(self, port: int, topic: str):
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-rx-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        data = json.loads(msg.payload)
        code = data.get("data", data).get("code")
        with self.lock:
            self.arrived.setdefault(code, now)

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def paced(send: Any, codes: list[str], rate: float) -> dict[str, float]:
    sent: dict[str, float] = {}
    t0 = time.monotonic()
    for n, code in enumerate(codes):
        delay = t0 + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[code] = time.monotonic()
        send(code)
    return sent


def latencies(sent: dict[str, float], rx: Receiver, timeout: float = 30) -> list[float]:
    wait_for(lambda: all(c in rx.arrived for c in sent), timeout, what="every message at the subscriber")
    return [rx.arrived[c] - t for c, t in sent.items()]


def burst_rate(send: Any, codes: list[str], rx: Receiver, before: int) -> float:
    t0 = time.monotonic()
    for code in codes:
        send(code)
    wait_for(lambda: rx.count() >= before + len(codes), 120, interval=0.005, what="the burst")
    return len(codes) / (max(rx.arrived.values()) - t0)


def one_run(tmp: Path, rate: float, seconds: float, burst: int, run: int) -> dict[str, float]:
    broker = Mosquitto(tmp).start()
    master, slave = os.openpty()
    tty.setraw(master)
    link = tmp / "scanner0"
    link.unlink(missing_ok=True)
    link.symlink_to(os.ttyname(slave))
    os.close(slave)
    http = free_port()
    cfg = write_config(tmp / "storelink.toml", STORE, broker.port, http,
                       f'[[devices]]\nid = "scanner0"\ndriver = "serial_scanner"\nport = "{link}"\n'
                       'baudrate = 115200\nterminator = "CR"\n')
    gw = GatewayProcess(cfg, http).start()
    out: dict[str, float] = {}
    try:
        wait_for(lambda: any(d["state"] == "ok" for d in gw.get("/api/v1/status")[1]["devices"]), 20,
                 what="scanner online")
        n = int(rate * seconds)
        base = n * 10 * (run + 1)

        # baseline: bare paho QoS 1, same payload shape, same rate, same broker
        rx_base = Receiver(broker.port, "bench/baseline")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()

        def publish(code: str) -> None:
            pub.publish("bench/baseline", json.dumps({"data": {"valid": True, "code": code, "type": "gtin"}}), qos=1)

        lat = latencies(paced(publish, [gtin(base + i) for i in range(n)], rate), rx_base)
        out["base_p50"], out["base_p99"], out["base_max"] = pct(lat, 0.5), pct(lat, 0.99), max(lat) * 1000
        out["base_burst"] = burst_rate(publish, [gtin(base + n + i) for i in range(burst)], rx_base, n)
        pub.loop_stop()
        pub.disconnect()
        rx_base.close()

        # the gateway: pty -> serial_scanner -> outbox -> uplink -> broker -> subscriber
        rx = Receiver(broker.port, f"storelink/{STORE}/events/scan")

        def scan(code: str) -> None:
            os.write(master, code.encode() + b"\r")

        codes = [gtin(base + 2 * n + burst + i) for i in range(n)]
        lat = latencies(paced(scan, codes, rate), rx)
        out["gw_p50"], out["gw_p99"], out["gw_max"] = pct(lat, 0.5), pct(lat, 0.99), max(lat) * 1000
        out["gw_max_at"] = lat.index(max(lat))  # which paced scan was the slowest (0: the first after start)
        out["gw_burst"] = burst_rate(scan, [gtin(base + 3 * n + burst + i) for i in range(burst)], rx, n)
        rx.close()
    finally:
        gw.terminate()
        os.close(master)
        broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="paced scans per second (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase (default %(default)s)")
    ap.add_argument("--burst", type=int, default=2000, help="scans in the burst phase (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="runs; figures are medians (default %(default)s)")
    args = ap.parse_args()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-scanner-") as tmp:
            r = one_run(Path(tmp), args.rate, args.seconds, args.burst, run)
        results.append(r)
        print(f"run {run + 1}: " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    n = int(args.rate * args.seconds)
    print(f"\nbaseline paho QoS1 publish -> subscriber at {args.rate:g}/s:  p50 {med['base_p50']:.2f} ms  "
          f"p99 {med['base_p99']:.2f} ms  max {med['base_max']:.2f} ms")
    print(f"gateway pty byte -> subscriber at {args.rate:g}/s:          p50 {med['gw_p50']:.2f} ms  "
          f"p99 {med['gw_p99']:.2f} ms  max {med['gw_max']:.2f} ms  "
          f"(ratio p50 {med['gw_p50'] / med['base_p50']:.1f}x, p99 {med['gw_p99'] / med['base_p99']:.1f}x)")
    print(f"burst of {args.burst}: gateway {med['gw_burst']:.0f} scans/s, bare paho {med['base_burst']:.0f} msg/s "
          f"(ratio {med['gw_burst'] / med['base_burst']:.2f})")
    verdict = "meets" if med["gw_p99"] <= 50 else "MISSES"
    print(f"target p99 <= 50 ms at 50 scans/s: {verdict} "
          f"(median of {args.runs} runs, {n} paced scans each, storage.synchronous = FULL)")


if __name__ == "__main__":
    main()
