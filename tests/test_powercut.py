"""Power cut and kill -9: a real `storelink run` keeps its data on a filesystem that loses everything not fsync'd
when its power is cut (tests/powercut_fs.py). Good and hostile input flow in, the power goes (or the process is
killed) mid-burst, and after the restart every event the gateway had acknowledged (an HTTP 202, a till's OK)
reaches head office.

The same run with ``storage.synchronous = "NORMAL"`` (commits not fsync'd) must lose acknowledged events: that shows
the filesystem really drops unsynced writes, so the FULL run proves something.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.hostile_helpers import TILL_SECRET, TillLine, sale
from tests.powercut_fs import PowerCutDisk, fuse_available

STORE = "store-0042"
pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"power-cut filesystem: {fuse_available()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutDisk]:
    d = PowerCutDisk(tmp_path / "disk", tmp_path / "mnt").mount()
    yield d
    d.unmount()


def _config(tmp_path: Path, mnt: Path, broker: int, http: int, till: int, synchronous: str) -> Path:
    cfg = write_config(tmp_path / "storelink.toml", STORE, broker, http,
                       f'[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{till}"\n'
                       f'till_id = "2"\nsecret = "{TILL_SECRET}"\nping_interval = 3600\n')
    text = cfg.read_text().replace(f'path = "{tmp_path / "storelink.db"}"',
                                   f'path = "{mnt / "storelink.db"}"\nsynchronous = "{synchronous}"')
    cfg.write_text(text)
    return cfg


def _burst(gw: GatewayProcess, till_port: int, acked: list[str], stop: threading.Event, worker: int) -> None:
    """Ingest events (with some hostile ones mixed in) and till sales until the gateway is gone."""
    till = None
    try:
        if worker == 0:
            till = TillLine(till_port)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if till is not None:
                    reply = till.request({"type": "SALE", "sale": sale(f"pc-{n}")})
                    if reply.get("type") == "OK":
                        acked.append(reply["event_id"])
                    till.replies_to(b'{"type":"SALE","id":1,"sale":{"extra":"\\ud800"}}')  # hostile, refused
                    continue
                status, body = gw.post("/api/v1/events", {"kind": "sale", "device": f"w{worker}", "data": {"n": n}})
                if status == 202:
                    acked.append(body["id"])
                gw.post("/api/v1/events", None, raw=b'{"kind":"sale","device":"d","data":{"v":NaN}}')
            except (OSError, ConnectionError, ValueError):
                return  # the gateway lost power under us: this one was never acknowledged
    finally:
        if till is not None:
            till.close()


def _power_cut_run(tmp_path: Path, disk: PowerCutDisk, synchronous: str, cut: bool = True
                   ) -> tuple[set[str], set[str]]:
    """(acknowledged, delivered after the restart); ``cut=False``: only kill -9, the disk keeps its cache."""
    broker = Mosquitto(tmp_path).start()
    http, till = free_port(), free_port()
    cfg = _config(tmp_path, disk.mountpoint, broker.port, http, till, synchronous)
    gw = GatewayProcess(cfg, http).start()
    try:
        gw.wait_online(20)
        broker.stop()  # head office unreachable: what is acknowledged can only be in the outbox when power goes
        wait_for(lambda: not gw.get("/api/v1/status")[1]["uplink"]["connected"], 15, what="the outage")
        acked: list[str] = []
        stop = threading.Event()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_burst, gw, till, acked, stop, w) for w in range(4)]
            wait_for(lambda: len(acked) >= 400, 60, what="a burst under way")
            if cut:
                disk.cut()  # the power goes: unsynced data is lost at this instant...
            gw.kill9()  # ...and the gateway with it
            stop.set()
            for f in futures:
                f.result()
        if cut:
            disk.mount()
        broker.start()
        head_office = Subscriber(broker.port, f"storelink/{STORE}/events/#")
        try:
            gw.start()
            wanted = set(acked)

            def delivered() -> set[str]:
                return {e["id"] for e in head_office.events(STORE)}

            wait_for(lambda: gw.get("/api/v1/status")[1]["outbox"]["depth"] == 0, 60, what="the outbox to drain")
            # PUBACKed is not yet at the subscriber: give the broker's fan-out time to bring every acknowledged
            # event (a count would not do: head office also gets the gateway's own events and rejection reports)
            deadline = time.monotonic() + 30
            while not wanted <= delivered() and time.monotonic() < deadline:
                time.sleep(0.2)
            return wanted, delivered()
        finally:
            head_office.close()
    finally:
        gw.stop()
        broker.stop()


def test_power_cut_loses_no_acknowledged_event(tmp_path: Path, disk: PowerCutDisk) -> None:
    acked, delivered = _power_cut_run(tmp_path, disk, "FULL")
    assert len(acked) >= 400
    lost = acked - delivered
    print(f"power cut, synchronous=FULL: {len(acked)} acknowledged, {len(lost)} lost")
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged events lost in the power cut"


def test_kill9_with_hostile_input_mixed_in_loses_no_acknowledged_event(tmp_path: Path, disk: PowerCutDisk) -> None:
    acked, delivered = _power_cut_run(tmp_path, disk, "FULL", cut=False)
    lost = acked - delivered
    print(f"kill -9, synchronous=FULL: {len(acked)} acknowledged, {len(lost)} lost")
    assert len(acked) >= 400 and not lost


def test_the_power_cut_really_drops_unsynced_writes(tmp_path: Path, disk: PowerCutDisk) -> None:
    acked, delivered = _power_cut_run(tmp_path, disk, "NORMAL")
    print(f"power cut, synchronous=NORMAL: {len(acked)} acknowledged, {len(acked - delivered)} lost")
    assert acked - delivered, "synchronous = NORMAL lost nothing: the power-cut filesystem is not cutting anything"
