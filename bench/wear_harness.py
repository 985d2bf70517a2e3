"""What bench/wear.py measures with: a real `storelink run` whose data lives on a loop-mounted ext4, its I/O
counters, an event poster over HTTP keep-alive, and a bare SQLite baseline run the same way.

Two numbers per measurement, both taken from the kernel:
- ``write_bytes`` of /proc/PID/io: bytes the process caused to be written to a block device (counted when a page
  cache page is dirtied, a 4 KiB page at a time; a page dirtied again before writeback counts once). The gateway's
  log file is kept off the loop device but its page writes count here too; its size is reported apart.
- device bytes: 512-byte sectors the loop device was asked to write (the data, ext4's metadata and its journal):
  what an SD card in that place would have to program. Only the gateway writes to that filesystem.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for
from tests.loopfs import LoopFs

STORE = "bench-wear"


def proc_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


@dataclass
class Counters:
    write_bytes: int
    device_bytes: int
    log_bytes: int
    at: float

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.write_bytes - other.write_bytes, self.device_bytes - other.device_bytes,
                        self.log_bytes - other.log_bytes, self.at - other.at)


class Poster:
    """One keep-alive HTTP connection to the ingest API (one per thread)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, body: Any) -> Any:
        self.conn.request("POST", "/api/v1/events", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 202:
            raise RuntimeError(f"ingest answered {resp.status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


class WearGateway:
    """``storelink run`` with storage on ``fs``; config and log beside it in ``workdir`` (not on ``fs``)."""

    def __init__(self, workdir: Path, fs: LoopFs, broker: Mosquitto, extra_toml: str = ""):
        self.workdir, self.fs, self.broker = workdir, fs, broker
        self.http_port = free_port()
        data = fs.mountpoint / "storelink"
        data.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "storelink.toml"
        cfg.write_text(
            f'store_id = "{STORE}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min = 0.2\nreconnect_max = 1.0\n'
            f'[storage]\npath = "{data / "storelink.db"}"\n'
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n' + extra_toml
        )
        self.proc = GatewayProcess(cfg, self.http_port)
        self.subscriber = Subscriber(broker.port, f"storelink/{STORE}/events/#")

    def start(self) -> WearGateway:
        self.proc.start()
        self.proc.wait_online(30)
        return self

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def counters(self) -> Counters:
        log_size = self.proc.log.stat().st_size if self.proc.log.exists() else 0
        return Counters(proc_write_bytes(self.pid), self.fs.sectors_written() * 512, log_size, time.monotonic())

    def delivered(self) -> int:
        return len(self.subscriber.events(STORE))

    def wait_drained(self, total: int, settle: float) -> None:
        """Until head office has ``total`` events and the outbox is empty, then ``settle`` seconds more (the
        outbox deletes lazily), so what a delivered event costs is all in the counters."""
        try:
            wait_for(lambda: self.delivered() >= total, 300, 0.05, what=f"{total} events at head office")
            wait_for(lambda: self.proc.get("/api/v1/status")[1]["outbox"]["depth"] == 0, 60, 0.05,
                     what="the outbox to empty")
        except AssertionError as err:
            status = self.status()
            raise AssertionError(f"{err}: outbox {status['outbox']}, uplink {status['uplink']}") from None
        time.sleep(settle)

    def status(self) -> dict[str, Any]:
        return dict(self.proc.get("/api/v1/status")[1])

    def stop(self) -> None:
        self.subscriber.close()
        if self.proc.proc is not None and self.proc.proc.poll() is None:
            self.proc.terminate()


_BARE = textwrap.dedent("""
    import sqlite3, sys, time
    path, n, size, rate, stat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    def wb():
        return int(next(l for l in open("/proc/self/io") if l.startswith("write_bytes:")).split()[1])
    def dev():
        return int(open(stat).read().split()[6]) * 512
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    payload = b"x" * size
    for _ in range(1100):  # the WAL at its working size and past its first checkpoint, as in the gateway run
        db.execute("INSERT INTO events(payload) VALUES (?)", (payload,))
    start, dev0, t = wb(), dev(), time.monotonic()
    for _ in range(n):
        if rate:
            t += 1 / rate
            time.sleep(max(0.0, t - time.monotonic()))
        db.execute("INSERT INTO events(payload) VALUES (?)", (payload,))  # autocommit: one transaction each
    print(wb() - start, dev() - dev0)
""")


def bare_sqlite(fs: LoopFs, n: int, payload_size: int, rate: float = 0.0) -> tuple[float, float]:
    """(write_bytes, device bytes) per event for the bare baseline: SQLite defaults (4 KiB pages, autocheckpoint
    1000) with WAL + synchronous=FULL, one INSERT per transaction, in its own process on the same filesystem."""
    path = fs.mountpoint / f"bare-{time.monotonic_ns()}.db"
    out = subprocess.run([sys.executable, "-c", _BARE, str(path), str(n), str(payload_size), str(rate),
                          fs.stat_path], capture_output=True, text=True, check=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    written, dev = (int(x) for x in out.stdout.split())
    return written / n, dev / n
