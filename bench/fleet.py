"""Fleet benchmark: head office's ingest into PostgreSQL against a bare MQTT subscriber, and the dashboard's pages.

    .venv/bin/python bench/fleet.py [--stores 2000] [--events 60000] [--gateways 3] [--workers 1,2,4] [--runs 3]

Starts its own Mosquitto and PostgreSQL (tests/pg_helpers.py). Each run: `--publishers` processes of lightweight
simulated stores (storelink.drivers.sim.fleet) plus `--gateways` real `storelink run` gateways (events posted to
their ingest API) publish a burst to one broker, which queues it for a bare paho subscriber's session and for the
sessions of N `storelink hq ingest` workers (one MQTT 5 shared subscription, the tracker on), all offline. So
both are measured at the rate they consume, not at the rate this box can publish: the bare subscriber drains its
copy first, alone, then the N workers drain theirs together into one PostgreSQL. Printed per worker count, medians
of `--runs`: ingest events/s (first message received to last row committed), the bare subscriber's events/s over
the same messages, their ratio (target with one worker >= 0.5), the fleet size it implies at 10 events/s per
store, and events per CPU second of the workers, of PostgreSQL and of the broker during the drain (the part with
the fewest per CPU second, times the cores it can use, is where adding workers stops helping). Then the
dashboard: `hq serve` over synthetic fleets of 5,000 to 50,000 stores, the time for a page (100 and 1,000 stores,
filtered and not), the whole fleet in pages of 1,000, and how many stores that lists in 200 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from storelink.drivers.sim.fleet import Fleet
from storelink.hq.db import open_database
from storelink.hq.schema import migrate
from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for, write_config
from tests.ingest_helpers import IngestProcess, ServeProcess, one
from tests.pg_helpers import Postgres

PER_STORE_RATE = 10.0  # events/s a busy store sends (tills, scanners, telemetry)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of these processes (from /proc), 0 for one that is gone."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def postgres_pids(pg: Postgres) -> list[int]:
    """The postmaster and every backend it forked (the workers' connections, the WAL writer, ...)."""
    master = int((pg.data / "postmaster.pid").read_text().split()[0])
    out = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


# -- processes -------------------------------------------------------------------------------------------------
def _publisher(port: int, stores: list[str], per_store: int) -> None:
    fleet = Fleet("127.0.0.1", port, stores, connections=2, name=f"p{os.getpid()}")
    fleet.births()
    fleet.burst(per_store)
    fleet.drain(600)
    fleet.close()


def bare_session(port: int, client_id: str, expected: int, subscribe: bool) -> dict[str, float]:
    """paho with its defaults (automatic PUBACK), on a persistent session: the ceiling for anything that consumes
    the same messages. subscribe=True only sets the session up; then it receives what was queued for it."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal got, first, last
        last = time.time()
        if not got:
            first = last
        got += 1
        if got >= expected:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 10_000  # as the ingest asks for
    client.connect("127.0.0.1", port, clean_start=subscribe, properties=props)
    if subscribe:
        client.subscribe("storelink/+/events/+", 1)
        client.loop_start()
        time.sleep(1.0)
        client.loop_stop()
        client.disconnect()
        return {}
    client.loop_start()
    done.wait(900)
    client.loop_stop()
    client.disconnect()
    return {"received": got, "first": first, "last": last}


def _bare_process(port: int, client_id: str, expected: int, out: Any) -> None:
    out.put(bare_session(port, client_id, expected, subscribe=False))


# -- one ingest run --------------------------------------------------------------------------------------------
def ingest_run(work: Path, pg: Postgres, broker: Mosquitto, workers: int, stores: int, events: int,
               publishers: int, gateways: list[GatewayProcess], gw_events: int, tag: str) -> dict[str, float]:
    """The burst waits at the broker, queued for a bare subscriber's session and for the ingest workers' sessions
    (all offline), so both are measured at the rate they can consume, not at the rate this box can publish. The
    bare subscriber drains first, alone; then the workers, together."""
    url = pg.new_database()
    per_store = events // stores
    names = [f"{tag}-{i:05d}" for i in range(stores)]
    expected = per_store * stores + gw_events * len(gateways)
    ctx = multiprocessing.get_context("spawn")
    procs = [IngestProcess(work, url, broker.port, f"{tag}-w{i}", "--share-group", f"g-{tag}",
                           "--session-expiry", "3600") for i in range(workers)]
    for w in procs:
        w.start()
    bare_id = f"bare-{tag}"
    bare_session(broker.port, bare_id, 0, subscribe=True)
    for w in procs:
        w.terminate()  # the sessions stay at the broker and queue what comes
    pubs = [ctx.Process(target=_publisher, args=(broker.port, names[i::publishers], per_store))
            for i in range(publishers)]
    for p in pubs:
        p.start()
    posters = [threading.Thread(target=_post_events, args=(gw, gw_events)) for gw in gateways]
    for t in posters:
        t.start()
    for t in posters:
        t.join()
    for p in pubs:
        p.join(600)
    for gw in gateways:
        wait_for(lambda gw=gw: gw.get("/api/v1/status")[1]["outbox"]["depth"] == 0, 120, what="gateway drained")

    result = ctx.Queue()
    bare = ctx.Process(target=_bare_process, args=(broker.port, bare_id, expected, result))
    bare.start()
    bare_out = result.get(timeout=900)
    bare.join(10)
    assert bare_out["received"] == expected, bare_out

    db = open_database(url)
    assert broker.proc is not None
    pg_before, broker_before = cpu_seconds(postgres_pids(pg)), cpu_seconds([broker.proc.pid])
    for w in procs:  # all at once: each drains its own share of the queue
        w.start(wait=False)
    wait_for(lambda: one(db, "SELECT count(*) FROM events") >= expected, 900, interval=0.5,
             what=f"{expected} events in PostgreSQL")
    landed = time.time()
    worker_cpu = cpu_seconds([w.proc.pid for w in procs if w.proc is not None])
    pg_cpu = cpu_seconds(postgres_pids(pg)) - pg_before
    broker_cpu = cpu_seconds([broker.proc.pid]) - broker_before
    first = float(one(db, "SELECT min(received_at) FROM events"))
    assert one(db, "SELECT count(*) FROM events") == expected  # exactly once
    db.close()
    for w in procs:
        w.terminate()
    # CPU per event of each part (events per CPU second): which one stops the scaling on a machine with more cores.
    return {"ingest": expected / (landed - first), "bare": expected / (bare_out["last"] - bare_out["first"]),
            "events": float(expected), "per_worker_cpu": expected / max(worker_cpu, 1e-9),
            "per_pg_cpu": expected / max(pg_cpu, 1e-9), "per_broker_cpu": expected / max(broker_cpu, 1e-9)}


def _post_events(gw: GatewayProcess, n: int) -> None:
    """A real store's in-store systems posting through the ingest API, in lists of 100."""
    for i in range(0, n, 100):
        body = [{"kind": "telemetry", "device": "sensor-1", "data": {"n": i + k}} for k in range(min(100, n - i))]
        status, _ = gw.post("/api/v1/events", body)
        assert status == 202, status


def start_gateways(work: Path, broker: Mosquitto, n: int) -> list[GatewayProcess]:
    out = []
    for i in range(n):
        d = work / f"gw{i}"
        d.mkdir()
        port = free_port()
        cfg = write_config(d / "storelink.toml", f"real-gw-{i}", broker.port, port)
        gw = GatewayProcess(cfg, port).start()
        gw.wait_online()
        out.append(gw)
    return out


# -- dashboard -------------------------------------------------------------------------------------------------
def seed_fleet(url: str, n: int) -> None:
    db = open_database(url)
    migrate(db)
    now = time.time()
    with db.transaction():
        db.executemany(
            "INSERT INTO stores (store_id, first_seen, online, state_since, version, group_list, price_version, "
            "latest_published, stale_devices, devices_total, devices_bad, outbox_depth, last_seen, problems, "
            "open_alerts) VALUES (?, ?, ?, ?, '0.1.0', ?, 41, 42, '[]', 8, '[]', 0, ?, ?, ?)",
            [(f"store-{i:05d}", now, int(i % 50 != 0), now - 600, json.dumps([f"region-{i % 20}"]), now,
              "offline" if i % 50 == 0 else "", int(i % 50 == 0)) for i in range(n)])
        db.executemany("INSERT INTO store_groups (group_name, store_id) VALUES (?, ?)",
                       [(f"region-{i % 20}", f"store-{i:05d}") for i in range(n)])
        db.executemany("INSERT INTO store_problems (problem, store_id) VALUES ('offline', ?)",
                       [(f"store-{i:05d}",) for i in range(0, n, 50)])
    db.execute("ANALYZE")
    db.close()


def timed_get(base: str, path: str, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=30) as resp:
            resp.read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def dashboard_bench(work: Path, pg: Postgres, sizes: list[int]) -> None:
    print("\ndashboard (hq serve over PostgreSQL, median of 7 GETs, ms):")
    print(f"  {'stores':>7} {'page 100':>9} {'1,000':>7} {'group 100':>10} {'offline 100':>12} {'all, 1,000/pg':>14} "
          f"{'listed in 200 ms':>17}")
    for n in sizes:
        url = pg.new_database()
        seed_fleet(url, n)
        serve = ServeProcess(work, url)
        try:
            base = serve.base_url
            first = timed_get(base, "/api/v1/fleet?limit=100")
            big = timed_get(base, "/api/v1/fleet?limit=1000")
            group = timed_get(base, "/api/v1/fleet?group=region-3&limit=100")
            offline = timed_get(base, "/api/v1/fleet?problem=offline&limit=100")
            t0 = time.perf_counter()
            after, listed = "", 0
            while True:
                with urllib.request.urlopen(f"{base}/api/v1/fleet?limit=1000&after={after}", timeout=60) as resp:
                    page = json.loads(resp.read())
                listed += len(page["stores"])
                if not page["next"]:
                    break
                after = page["next"]
            whole = (time.perf_counter() - t0) * 1000
            assert listed == n
            print(f"  {n:>7} {first:>9.1f} {big:>7.1f} {group:>10.1f} {offline:>12.1f} {whole:>14.0f} "
                  f"{min(n, int(n * 200 / whole)):>17}")
        finally:
            serve.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", type=int, default=2000)
    p.add_argument("--events", type=int, default=60_000, help="events from the simulated stores per run")
    p.add_argument("--gateways", type=int, default=3, help="real storelink run gateways")
    p.add_argument("--gateway-events", type=int, default=1000, help="events per real gateway per run")
    p.add_argument("--publishers", type=int, default=2, help="processes of simulated stores")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dashboard", default="5000,20000,50000", help="fleet sizes for the dashboard (0: skip)")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work, extra_conf="max_queued_messages 0\n").start()
        pg = Postgres().start()
        gateways = start_gateways(work, broker, args.gateways)
        try:
            print(f"{args.stores} simulated stores ({args.publishers} processes) + {args.gateways} real gateways, "
                  f"{args.events + args.gateways * args.gateway_events} events per run, {args.runs} runs, "
                  f"{os.cpu_count()} CPUs")
            print(f"  {'workers':>7} {'ingest/s':>9} {'bare/s':>8} {'ratio':>6} {'fleet @10/s':>12} "
                  f"{'ev/cpu-s: ingest':>17} {'postgres':>9} {'broker':>7}   runs (ingest/bare)")
            for w in [int(x) for x in args.workers.split(",")]:
                runs = []
                for r in range(args.runs):
                    res = ingest_run(work, pg, broker, w, args.stores, args.events, args.publishers, gateways,
                                     args.gateway_events, f"r{w}{r}")
                    runs.append(res)
                ingest = statistics.median(x["ingest"] for x in runs)
                bare = statistics.median(x["bare"] for x in runs)
                ratio = statistics.median(x["ingest"] / x["bare"] for x in runs)
                shown = ", ".join(f"{x['ingest']:.0f}/{x['bare']:.0f}" for x in runs)
                cpu = {k: statistics.median(x[k] for x in runs) for k in ("per_worker_cpu", "per_pg_cpu",
                                                                           "per_broker_cpu")}
                print(f"  {w:>7} {ingest:>9.0f} {bare:>8.0f} {ratio:>6.2f} {ingest / PER_STORE_RATE:>12.0f} "
                      f"{cpu['per_worker_cpu']:>17.0f} {cpu['per_pg_cpu']:>9.0f} {cpu['per_broker_cpu']:>7.0f}   "
                      f"{shown}", flush=True)
            sizes = [int(x) for x in args.dashboard.split(",") if int(x)]
            if sizes:
                dashboard_bench(work, pg, sizes)
        finally:
            for gw in gateways:
                gw.stop()
            pg.stop()
            broker.stop()


if __name__ == "__main__":
    main()
