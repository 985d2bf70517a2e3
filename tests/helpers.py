"""Real parts for tests: a Mosquitto broker on a free port, a `storelink run` process, an MQTT subscriber."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests import contract_check

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
STORELINK = str(Path(sys.executable).parent / "storelink")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def end_process(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """Wait for a process that was asked to stop; kill it if it does not within ``timeout``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Mosquitto:
    """A real broker the test starts, stops (an outage) and starts again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = ""):
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.write_conf(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\nmax_inflight_messages 0\n{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"

    def write_conf(self, body: str) -> None:
        # Run as root, mosquitto would drop to the "mosquitto" user, who cannot read pytest's private tmp dirs.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(user + body)

    def start(self) -> Mosquitto:
        if not os.path.exists(MOSQUITTO):
            raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(self._accepting, 10, what=f"mosquitto on port {self.port}")
        return self

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            end_process(self.proc)
        self.proc = None


class Subscriber:
    """Plays head office: collects every message on a topic filter, each checked against the MQTT contract."""

    def __init__(self, port: int, topic: str = "storelink/#", client_id: str | None = None):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.topic = topic
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscriber did not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        contract_check.check(msg.topic, bytes(msg.payload))
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def json(self, prefix: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _r in self.messages if t.startswith(prefix) and p]

    def events(self, store_id: str) -> list[dict[str, Any]]:
        return self.json(f"storelink/{store_id}/events/")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, store_id: str, broker_port: int, http_port: int, extra: str = "") -> Path:
    path.write_text(
        f'store_id = "{store_id}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nreconnect_min = 0.2\nreconnect_max = 1.0\n'
        f'[storage]\npath = "{path.parent / "storelink.db"}"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n' + extra
    )
    return path


class ChildProcess:
    """A real process the test started: kill -9 it, stop it cleanly, or make sure it is gone."""

    proc: subprocess.Popen[bytes] | None = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class GatewayProcess(ChildProcess):
    """A real `storelink run` process (so tests can kill -9 it)."""

    def __init__(self, config: Path, http_port: int, env: dict[str, str] | None = None):
        self.config = config
        self.http_port = http_port
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "storelink.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait: bool = True) -> GatewayProcess:
        env = {**os.environ, **(self.env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([STORELINK, "run", "--config", str(self.config)], stdout=log,
                                         stderr=log, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(self._ready, timeout, what="storelink to answer /api/v1/status")

    def wait_online(self, timeout: float = 15, what: str = "the uplink connected and subscribed") -> None:
        """Until the broker has granted every subscription: a command or price batch sent earlier could be lost."""
        wait_for(lambda: self.get("/api/v1/status")[1]["uplink"]["subscribed"], timeout, what=what)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"storelink exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return self.get("/api/v1/status")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def post(self, path: str, body: Any, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")
