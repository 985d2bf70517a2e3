"""Kiosk mat and customer sessions: debounce with a fake clock, a real gateway with a MockFactory pin, and the
promise that stepping off erases the customer's data from memory and disk (down to the database file bytes)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from storelink.drivers.base import Health
from storelink.drivers.kiosk_mat import MatLogic
from storelink.kiosk.sessions import KioskEvent, KioskSessions, NoActiveSession
from tests.helpers import Mosquitto, Subscriber
from tests.input_helpers import STORE, base_config, running_gateway, until

SECRET = "LOYAL-4242-SECRET"


def test_debounce_and_leave_timer_with_a_fake_clock() -> None:
    m = MatLogic(debounce_s=0.05, leave_after_s=5.0, max_session_s=1800)
    m.edge(False, 0.0)
    m.edge(True, 1.00)  # contacts bounce as the customer steps on
    m.edge(False, 1.01)
    m.edge(True, 1.02)
    assert m.poll(1.06) == []  # only 40 ms since the last bounce
    assert m.poll(1.07) == [("start", "stepped_on")]
    m.edge(False, 2.0)  # shifting weight: off for 1 s, back on
    assert m.poll(2.9) == []
    m.edge(True, 3.0)
    assert m.poll(100.0) == [] and m.occupied
    m.edge(False, 200.0)
    assert m.poll(204.9) == []
    assert m.poll(205.0) == [("end", "stepped_off")]
    m.edge(True, 300.0)  # a 30 ms tap (a dropped bag) is not a customer
    m.edge(False, 300.03)
    assert m.poll(400.0) == [] and not m.occupied


def test_a_mat_left_pressed_ends_the_session_after_max_session() -> None:
    m = MatLogic(debounce_s=0.05, leave_after_s=5.0, max_session_s=600)
    m.edge(True, 0.0)
    assert m.poll(0.05) == [("start", "stepped_on")]
    assert m.poll(600.06) == [("end", "max_duration")]
    assert m.poll(10_000.0) == []  # no new session until someone steps off and on again
    m.edge(False, 10_001.0)
    m.edge(True, 10_002.0)
    assert m.poll(10_002.05) == [("start", "stepped_on")]


@pytest.fixture
def mock_pins() -> Iterator[MockFactory]:
    previous = Device.pin_factory
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = previous


def mat_config(tmp_path: Path, port: int) -> dict[str, Any]:
    return base_config(tmp_path, port, [{"id": "mat-1", "driver": "kiosk_mat", "pin": 17, "kiosk_id": "kiosk-1",
                                         "debounce_s": 0.02, "leave_after_s": 0.4}])


def db_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.glob("kiosk.db*")))


async def test_stepping_off_purges_every_piece_of_customer_data(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, mock_pins: MockFactory
) -> None:
    pin = mock_pins.pin(17)
    heard: list[KioskEvent] = []
    elsewhere = tmp_path / "print-spool" / "receipt-kiosk-1.txt"  # a part's file outside the session dir
    elsewhere.parent.mkdir()
    own_db = sqlite3.connect(tmp_path / "cart-feature.db", isolation_level=None)  # a part's own store
    own_db.execute("CREATE TABLE carts (kiosk TEXT, email TEXT)")

    async with running_gateway(mat_config(tmp_path, mosquitto.port)) as gw:
        kiosk = gw.kiosk
        assert kiosk is not None

        async def listener(ev: KioskEvent) -> None:
            heard.append(ev)

        kiosk.add_listener(listener)
        await until(lambda: gw.supervisor.devices["mat-1"].state == Health.OK, what="mat online")
        with pytest.raises(NoActiveSession):
            kiosk.store("kiosk-1", "cart", ["too early"])
        for _ in range(3):  # bouncing contacts
            pin.drive_low()
            pin.drive_high()
        pin.drive_low()
        await until(lambda: kiosk.active("kiosk-1"), what="session started")
        session = kiosk.session_id("kiosk-1")

        kiosk.store("kiosk-1", "cart", [{"sku": "4711", "qty": 2}])
        kiosk.store("kiosk-1", "email", "alice@example.com")
        await kiosk.persist("kiosk-1", "loyalty", {"card": SECRET})
        session_file = kiosk.session_dir("kiosk-1") / "wishlist.json"
        session_file.write_text(json.dumps({"card": SECRET}))
        elsewhere.write_text(f"receipt for {SECRET}")
        await kiosk.register_file("kiosk-1", elsewhere)
        own_db.execute("INSERT INTO carts VALUES ('kiosk-1', ?)", (SECRET,))
        kiosk.register_purge("kiosk-1", lambda: own_db.execute("DELETE FROM carts WHERE kiosk='kiosk-1'") and None)
        assert SECRET.encode() in db_bytes(kiosk.data_dir)  # (so the check below can fail)
        assert await kiosk.load("kiosk-1", "loyalty") == {"card": SECRET}

        pin.drive_high()  # a step back for 0.1 s does not end the session
        await asyncio.sleep(0.1)
        pin.drive_low()
        await asyncio.sleep(0.5)
        assert kiosk.active("kiosk-1") and kiosk.session_id("kiosk-1") == session

        pin.drive_high()  # steps off
        await until(lambda: "kiosk-1" not in kiosk.status()["sessions"], 5, what="session ended and purged")
        assert not kiosk.active("kiosk-1")
        assert kiosk.get("kiosk-1", "cart") is None and kiosk.get("kiosk-1", "email") is None
        assert await kiosk.load("kiosk-1", "loyalty") is None
        with pytest.raises(NoActiveSession):
            kiosk.store("kiosk-1", "cart", [])
        assert not session_file.exists() and not session_file.parent.exists() and not elsewhere.exists()
        assert own_db.execute("SELECT count(*) FROM carts").fetchone() == (0,)
        assert SECRET.encode() not in db_bytes(kiosk.data_dir)  # not in free pages, not in the WAL
        await until(lambda: len([e for e in subscriber.events(STORE) if e["kind"].startswith("kiosk.")]) == 2,
                    what="kiosk events at head office")
        assert kiosk.status()["sessions"] == {}

    assert [(e.kind, e.kiosk_id, e.session_id) for e in heard] == [("started", "kiosk-1", session),
                                                                    ("ended", "kiosk-1", session)]
    events = [e for e in subscriber.events(STORE) if e["kind"].startswith("kiosk.")]
    assert [e["kind"] for e in events] == ["kiosk.session_started", "kiosk.session_ended"]
    ended = events[1]["data"]
    assert set(ended) == {"kiosk", "session", "duration_s", "reason", "purge_failures"}
    assert ended["reason"] == "stepped_off" and ended["purge_failures"] == 0 and ended["duration_s"] > 0.5
    assert set(events[0]["data"]) == {"kiosk", "session", "started_at"}
    everything = b"".join(p for _t, p, _r in subscriber.messages)
    assert SECRET.encode() not in everything and b"alice" not in everything and b"4711" not in everything


async def test_stopping_the_gateway_mid_session_purges_too(
    tmp_path: Path, mosquitto: Mosquitto, mock_pins: MockFactory
) -> None:
    pin = mock_pins.pin(17)
    async with running_gateway(mat_config(tmp_path, mosquitto.port)) as gw:
        kiosk = gw.kiosk
        assert kiosk is not None
        await until(lambda: gw.supervisor.devices["mat-1"].state == Health.OK, what="mat online")
        pin.drive_low()
        await until(lambda: kiosk.active("kiosk-1"), what="session started")
        await kiosk.persist("kiosk-1", "loyalty", SECRET)
        (kiosk.session_dir("kiosk-1") / "f").write_text(SECRET)
    assert SECRET.encode() not in db_bytes(kiosk.data_dir)
    assert not (kiosk.data_dir / "sessions").exists() or not any((kiosk.data_dir / "sessions").iterdir())


_CRASHING_KIOSK = """
import asyncio, sys
from pathlib import Path
from storelink.kiosk.sessions import KioskSessions

async def main():
    async def emit(kind, device, data): pass
    k = KioskSessions(Path(sys.argv[1]), emit)
    await k.open()
    await k.session_started("kiosk-1")
    await k.persist("kiosk-1", "loyalty", {"card": sys.argv[2]})
    (k.session_dir("kiosk-1") / "wishlist.txt").write_text(sys.argv[2])
    await k.register_file("kiosk-1", Path(sys.argv[3]))
    print("in session", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _kill_9_mid_session(data_dir: Path, spool: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_KIOSK, str(data_dir), SECRET, str(spool)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "in session"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_a_session_cut_by_kill_9_is_purged_at_the_next_start(tmp_path: Path) -> None:
    data_dir, spool = tmp_path / "kiosk", tmp_path / "spool.txt"
    spool.write_text(SECRET)
    _kill_9_mid_session(data_dir, spool)
    assert SECRET.encode() in db_bytes(data_dir) and spool.exists()

    emitted: list[tuple[str, str, dict[str, Any]]] = []

    async def emit(kind: str, device: str, data: dict[str, Any]) -> None:
        emitted.append((kind, device, data))

    k = KioskSessions(data_dir, emit)
    await k.open()
    try:
        assert [(kind, dev, d["reason"]) for kind, dev, d in emitted] == [("kiosk.session_ended", "kiosk-1", "restart")]
        assert not spool.exists() and not (data_dir / "sessions").exists()
        assert SECRET.encode() not in db_bytes(data_dir) and not k.active("kiosk-1")
    finally:
        await k.close()
