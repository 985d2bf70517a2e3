"""A real `storelink run` under a fake systemd: this test binds the notify socket and sets WATCHDOG_USEC, as
systemd does for a Type=notify unit with WatchdogSec=, then freezes the process with SIGSTOP and checks that
the pings stop for longer than the interval (so systemd would restart it), and resume after SIGCONT."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.helpers import GatewayProcess
from tests.systemd_helpers import NotifyListener, longest_gap

INTERVAL = 1.0  # WatchdogSec=1s: the gateway must ping every 0.5 s


def test_kill_stop_stops_the_watchdog_pings(gateway_config: Path, tmp_path: Path) -> None:
    http_port = int(gateway_config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
    with NotifyListener(tmp_path / "notify.sock") as systemd:
        env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(int(INTERVAL * 1_000_000))}
        gw = GatewayProcess(gateway_config, http_port, env=env)
        gw.start(wait=False)
        try:
            try:
                systemd.wait_count("READY=1", 1, timeout=30)
            except AssertionError as err:
                raise AssertionError(f"{err}\n--- storelink log ---\n{gw.log.read_text()[-3000:]}") from None
            # READY=1 means config loaded, database open and HTTP up: the API answers at once.
            assert gw.get("/api/v1/status")[0] == 200
            ready_at = systemd.times_of("READY=1")[0]
            systemd.wait_count("WATCHDOG=1", 4, timeout=10)
            time.sleep(1.5)
            healthy_until = time.monotonic()
            assert longest_gap(systemd.times_of("WATCHDOG=1"), ready_at + INTERVAL, healthy_until) < INTERVAL

            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            time.sleep(3 * INTERVAL)
            resumed_at = time.monotonic()
            gw.proc.send_signal(signal.SIGCONT)

            pings = systemd.times_of("WATCHDOG=1")
            # A datagram already in flight when the signal landed may still arrive a moment later.
            assert not [t for t in pings if stopped_at + 0.1 < t < resumed_at], "pinged while stopped"
            assert longest_gap(pings, stopped_at, resumed_at) > 2 * INTERVAL
            print(f"silent for {longest_gap(pings, stopped_at - INTERVAL, resumed_at):.2f} s while stopped")

            before = len(pings)
            systemd.wait_count("WATCHDOG=1", before + 3, timeout=5)
            first_after = min(t for t in systemd.times_of("WATCHDOG=1") if t > resumed_at)
            assert first_after - resumed_at < INTERVAL, "pings resume promptly after SIGCONT"

            assert gw.terminate(timeout=20) == 0
            systemd.wait_count("STOPPING=1", 1, timeout=5)
        finally:
            gw.stop()
