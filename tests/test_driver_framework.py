"""The driver framework with real processes: drivers found through the installed entry points, config errors that
name the device and the key, and supervision (a failing driver restarts with backoff, never takes the gateway
down, and its health is in the status API and retained on the broker)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from storelink.devices.registry import available_drivers
from storelink.drivers.plu_file import PluFileDriver
from storelink.drivers.sim.till import TillSimulator
from storelink.drivers.till_tcp import TillTcpDriver
from tests.helpers import STORELINK, GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config

STORE = "store-0042"


def test_drivers_come_from_the_installed_entry_points() -> None:
    found = available_drivers()
    assert found["till_tcp"] is TillTcpDriver and found["plu_file"] is PluFileDriver


def _check(tmp_path: Path, devices: str) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp_path / "bad.toml", STORE, 1883, 8080, devices)
    return subprocess.run([STORELINK, "check-config", str(cfg)], capture_output=True, text=True, timeout=60)


def test_config_errors_name_the_device_and_the_key(tmp_path: Path) -> None:
    res = _check(tmp_path, '[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "the-back-office"\nprot = 1\n'
                           '[[devices]]\nid = "pos"\ndriver = "plu_file"\ndelimiter = ";;"\n'
                           '[[devices]]\nid = "x"\ndriver = "teleporter"\n'
                           '[[devices]]\nid = "pos"\ndriver = "plu_file"\ndirectory = "/srv/pos"\n')
    assert res.returncode == 1, res
    err = res.stderr
    assert "devices[0] (id='till-1').listen: must be HOST:PORT, got 'the-back-office'" in err
    assert "devices[0] (id='till-1').prot: unknown key" in err
    assert "devices[1] (id='pos').directory: required key is missing" in err
    assert "devices[1] (id='pos').delimiter: String should have at most 1 character" in err
    assert "devices[2] (id='x').driver: unknown driver 'teleporter' (known: " in err and "till_tcp" in err
    assert "devices[3] (id='pos').id: duplicate device id 'pos'" in err
    good = _check(tmp_path, '[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = ":7700"\n'
                            'secret = "a-long-enough-till-secret"\n')
    assert good.returncode == 0 and "1 devices" in good.stdout


def _device(gw: GatewayProcess, device: str) -> dict[str, Any]:
    return next(d for d in gw.get("/api/v1/status")[1]["devices"] if d["device"] == device)


def _retained_state(port: int, device: str) -> dict[str, Any]:
    """What head office sees when it subscribes now: the retained device state."""
    late = Subscriber(port, f"storelink/{STORE}/devices/{device}/state")
    try:
        wait_for(lambda: late.messages, 10, what=f"retained state of {device}")
        _topic, payload, retained = late.messages[0]
        assert retained
        return dict(json.loads(payload))
    finally:
        late.close()


def test_failing_driver_is_restarted_with_backoff_and_the_gateway_carries_on(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    till_port = free_port()
    blocker = socket.socket()  # something else owns the till port: the driver cannot start
    blocker.bind(("127.0.0.1", till_port))
    blocker.listen()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, free_port(),
                       f'[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{till_port}"\n'
                       'till_id = "1"\n')
    gw = GatewayProcess(cfg, int(cfg.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])).start()
    try:
        t0 = time.monotonic()
        dev = wait_for(lambda: (d := _device(gw, "till-1"))["restarts"] >= 2 and d, 20, what="two restarts")
        assert dev["state"] == "offline" and "cannot listen for tills on 127.0.0.1" in dev["last_error"]
        # Backoff, not a tight loop: a handful of attempts in the first seconds, not thousands.
        time.sleep(2)
        elapsed = time.monotonic() - t0
        assert _device(gw, "till-1")["restarts"] <= 2 + elapsed, _device(gw, "till-1")
        # The rest of the gateway is unaffected.
        status, body = gw.post("/api/v1/events", {"kind": "telemetry", "device": "probe", "data": {}})
        assert status == 202, body
        state = _retained_state(mosquitto.port, "till-1")
        assert state["state"] == "offline" and "cannot listen" in state["last_error"]

        blocker.close()  # the port is free again: the next restart succeeds and waits for the till
        wait_for(lambda: "waiting for till" in (_device(gw, "till-1")["last_error"] or ""), 90, what="listening")

        async def till_connects() -> tuple[dict[str, Any], dict[str, Any]]:
            sim = TillSimulator("127.0.0.1", till_port, "1")
            await sim.connect()
            try:
                dev = await asyncio.to_thread(
                    wait_for, lambda: (d := _device(gw, "till-1"))["state"] == "ok" and d, 10, 0.05, "ok")
                return dev, await asyncio.to_thread(_retained_state, mosquitto.port, "till-1")
            finally:
                await sim.close()

        dev, state = asyncio.run(till_connects())
        assert dev["last_error"] is None and dev["last_seen"] and dev["next_start"] is None
        assert state["state"] == "ok" and state["last_seen"] and state["driver"] == "till_tcp"
        assert gw.terminate() == 0
    finally:
        blocker.close()
        gw.stop()


def test_only_the_drivers_a_config_names_are_imported(tmp_path: Path) -> None:
    # Each driver module pulls in its own libraries (biip, gpiozero, evdev, python-escpos): ~17 MB for all of ours,
    # which a gateway with only tills must not carry on a Pi.
    cfg = write_config(tmp_path / "storelink.toml", STORE, 1883, 8080,
                       '[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "127.0.0.1:7700"\n')
    probe = (
        "import json, sys; from storelink.config import load_config; from storelink.app import Gateway\n"
        f"Gateway(load_config({str(cfg)!r}))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('storelink.drivers.') or m.split('.')[0] in "
        "('biip', 'gpiozero', 'evdev', 'escpos', 'serial'))))\n"
    )
    out = subprocess.run([str(Path(STORELINK).parent / "python"), "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = json.loads(out)
    assert "storelink.drivers.till_tcp" in loaded, loaded
    assert not {"storelink.drivers.kiosk_mat", "storelink.drivers.serial_scanner",
                "storelink.drivers.openepaperlink", "biip", "gpiozero", "evdev", "escpos"} & set(loaded), loaded
