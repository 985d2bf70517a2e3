"""An expected device fault (a folder that is not there, a printer that is off, a scanner unplugged) is one log line
per state change, not a traceback per restart, and the status says it in plain words; a driver bug logs its
traceback once, not on every restart, and the page says "internal error" instead of a Python exception name."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest

from storelink.devices import supervisor as sup
from storelink.drivers.base import DeviceConfig, Driver, plain_error
from storelink.system.watchdog import ProgressWatchdog
from tests.helpers import GatewayProcess, free_port, wait_for, write_config

PYTHON_NAMES = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|\[Errno|Traceback")


def test_expected_faults_are_one_line_per_change_in_plain_words(tmp_path: Path) -> None:
    missing = tmp_path / "pos-import"
    http = free_port()
    cfg = write_config(tmp_path / "storelink.toml", "store-0042", free_port(), http, (
        f'[[devices]]\nid = "pos"\ndriver = "plu_file"\ndirectory = "{missing}"\ncheck_interval = 1\n'
        f'[[devices]]\nid = "labels-1"\ndriver = "zpl_printer"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        'retry_interval = 0.2\n'
        f'[[devices]]\nid = "slips-1"\ndriver = "escpos_printer"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        'status_interval = 0.5\n'
        f'[[devices]]\nid = "scanner-1"\ndriver = "serial_scanner"\nport = "{tmp_path / "ttyUSB-gone"}"\n'))
    gw = GatewayProcess(cfg, http).start()
    try:
        def devices() -> dict[str, dict[str, Any]]:
            return {d["device"]: d for d in gw.get("/api/v1/status")[1]["devices"]}

        wait_for(lambda: devices()["pos"]["restarts"] >= 3 and devices()["scanner-1"]["restarts"] >= 3, 30,
                 what="three restarts of the drivers that cannot start")
        errors = {name: d["last_error"] for name, d in devices().items()}
        assert errors["pos"] == f"price file directory {missing} does not exist (share not mounted?)"
        assert errors["scanner-1"].startswith(f"could not open port {tmp_path / 'ttyUSB-gone'}: No such file")
        assert errors["labels-1"].startswith("cannot connect to 127.0.0.1:")
        assert errors["labels-1"].endswith(": connection refused")
        assert "connection refused" in errors["slips-1"].lower()
        for name, text in errors.items():
            assert not PYTHON_NAMES.search(text), f"{name}: {text}"
        log = gw.log.read_text()
        assert "Traceback" not in log, log[-3000:]
        assert log.count("device pos is offline: price file directory") == 1, log
        assert log.count("device scanner-1 is offline: could not open port") == 1, log

        missing.mkdir()  # the share is mounted: the next start works, and that is one more line
        wait_for(lambda: devices()["pos"]["state"] == "ok", 30, what="pos ok once its folder exists")
        assert gw.log.read_text().count("device pos is ok") == 1
    finally:
        gw.stop()


class Buggy(Driver):
    config_model: ClassVar[type[DeviceConfig]] = DeviceConfig

    async def run(self) -> None:
        raise KeyError("price")  # a bug in a driver, not a device fault


async def test_a_driver_bug_logs_its_traceback_once_and_the_status_says_internal_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(sup, "load_driver", lambda _name: Buggy)
    published: list[Any] = []

    async def emit(*_a: Any) -> Any:
        raise AssertionError("nothing to emit")

    services = sup.DeviceServices(data_dir=tmp_path, storage_sync="FULL", watchdog=ProgressWatchdog())
    supervisor = sup.DeviceSupervisor([DeviceConfig(id="buggy", driver="buggy")], "store-0042", emit,
                                      lambda _t, p: published.append(p), lambda d: f"devices/{d}/state",
                                      services, backoff=(0.01, 0.02))
    caplog.set_level(logging.INFO, logger="storelink.devices.supervisor")
    task = asyncio.create_task(supervisor.run())
    try:
        for _ in range(300):
            if supervisor.devices["buggy"].restarts >= 4:
                break
            await asyncio.sleep(0.01)
        status = supervisor.status()[0]
        assert status["restarts"] >= 4 and status["last_error"] == sup.INTERNAL_ERROR
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1 and "internal error" in tracebacks[0].getMessage()
        assert sum("is offline" in r.getMessage() for r in caplog.records) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("err", "words"), [
    (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9100)"), "connection refused"),
    (FileNotFoundError(2, "No such file or directory", "/dev/ttyUSB0"), "no such file or directory: /dev/ttyUSB0"),
    (TimeoutError(), "no answer in time"),
    (OSError("could not open port /dev/ttyS9: [Errno 13] Permission denied:\n'/dev/ttyS9'"),
     "could not open port /dev/ttyS9: Permission denied: '/dev/ttyS9'"),
    (RuntimeError(), "runtime error"),
])
def test_plain_error_words(err: BaseException, words: str) -> None:
    assert plain_error(err) == words
