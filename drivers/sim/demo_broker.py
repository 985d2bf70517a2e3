"""The demo's broker: a private Mosquitto on a loopback port, the same broker a store talks to in production (it
speaks MQTT 5 and 3.1.1, so the gateway and `storelink hq` work against it as they would against head office's).

It runs from its own config in the demo's work directory, never the system's broker, with persistence on: the
story stops and starts it to show an outage, and a clean stop saves its sessions and retained messages, so head
office's persistent session gets what the store sent while it was down (a real broker keeps them too).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SEARCHED = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(Exception):
    """The demo cannot run its broker; the message says what to do."""


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in SEARCHED if os.access(p, os.X_OK)), None)


class DemoBroker:
    def __init__(self, workdir: Path, port: int):
        self.port = port
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("the demo needs Mosquitto, the MQTT broker: run `bash scripts/demo.sh` (it installs "
                              "it) or `sudo apt-get install mosquitto`")
        self.binary = binary
        # As root, mosquitto would switch to its own user, who cannot write the demo's private directory.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {workdir}/\nmax_queued_messages 10000\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections (blocking: call it from a thread)."""
        with socket.socket() as probe:  # another program on the port would answer our connect instead
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto: a restart meets TIME_WAIT
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                raise BrokerError(f"cannot run the demo's broker on {self.address}: address already in use; change "
                                  "--broker-port (or leave it out: a free port is picked)") from None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(self._why_it_stopped())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if self.proc.poll() is None:
                return
            raise BrokerError(self._why_it_stopped())
        self.stop()
        raise BrokerError(f"Mosquitto did not accept connections on {self.address} within {timeout:g} s "
                          f"(its log: {self.log})")

    def _why_it_stopped(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        if "Address already in use" in last:
            return (f"cannot run the demo's broker on {self.address}: address already in use; change --broker-port "
                    "(or leave it out: a free port is picked)")
        return f"the demo's broker (Mosquitto) stopped at once: {last} (its log: {self.log})"

    def stop(self) -> None:
        """A clean stop (SIGTERM): Mosquitto saves its sessions and retained messages first."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
