"""`storelink demo` as a newcomer meets it: a real demo process with its own Mosquitto tells its story in order,
one readable line per step, and the head-office commands it prints work when pasted while it runs (the store
applies the price change, answers the command, applies the config)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import STORELINK

# Round 1 of the story, step by step, in this order (one line each).
STORY = [
    r"The store is set up: price list version 1 \(4 items\)",
    r"-- round 1 -- status page http://127\.0\.0\.1:\d+/ · token demo-[0-9a-f]{16}",
    r"1\. till-1 rings up sale T1-\S+ .* -> on disk in the outbox \(seq \d+\) before the till hears OK",
    r"2\. head office received sale T1-",
    r"3\. scanner-1 reads an EAN-13 -> good scan of GTIN 4006381333931, sent to head office",
    r"4\. scanner-1 reads a garbled code -> rejected \(garbled: ",
    r"5\. head office publishes price change v2: 1001 Oat milk 1 l 1\.99 -> 2\.49 \(up\), "
    r"1002 Dark chocolate 100 g 3\.49 -> 2\.99 \(down\)",
    r"6\. prepared on esl-ap, labels-1, pos-prices, till-1",
    r"7\. committed; until every label confirms, till-1 charges 1001 1\.99, 1002 2\.99: the lower of old and new",
    r"8\. labels-1 printed 2 shelf labels: Oat milk 1 l €2\.49; Dark chocolate 100 g €2\.99",
    r"9\. ESL tag \.\.\.E401 checked in: Oat milk 1 l €2\.49 \(1 of 2\)",
    r"10\. ESL tag \.\.\.E402 checked in: Dark chocolate 100 g €2\.99 \(2 of 2\)",
    r"11\. every label shows v2: till-1 now charges the new prices, 1001 2\.49 and 1002 2\.99",
    r"12\. kiosk-1: a customer steps on the mat -> a session starts",
    r"13\. kiosk-1: they sign in; head office sends their online cart over MQTT: 1 x Olive oil",
    r"14\. slips-1 printed the order slip for the stock room \(pick number \d{6}, 2 items\)",
    r"15\. kiosk-1: the customer steps off -> session ended \(stepped_off\), cart purged",
    r"16\. the broker goes away \(127\.0\.0\.1:\d+ stopped\): head office is unreachable",
    r"17\. till-1 rings up 2 sales meanwhile -> kept in the outbox: [2-9] events waiting",
    r"18\. the broker is back: the gateway delivers the [2-9] waiting events; head office has both sales, in order",
    r"-- next round in \d+ s",
]


class Demo:
    """A running `storelink demo` whose console lines the test can wait for."""

    def __init__(self, *args: str, log: Path):
        self.lines: list[str] = []
        self.stderr = log
        self.proc = subprocess.Popen([STORELINK, "demo", *args], stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if re.search(pattern, line)), None)
            if found is not None:
                return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout:g} s:\n" + "\n".join(self.lines[-40:])
                             + "\n--- stderr ---\n" + self.stderr.read_text()[-3000:])

    def commands(self) -> dict[str, list[str]]:
        """The printed head-office commands, by subcommand (status, publish-prices, cmd, push-config)."""
        out = {}
        for line in self.lines:
            if " hq " in line and line.startswith("  /"):
                argv = shlex.split(line)
                out[argv[argv.index("hq") + 1]] = argv
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    # A long pause: the test plays head office between rounds, and round 2 stops the broker (step 16) however
    # slowly a loaded machine runs the commands.
    d = Demo("--listen", "127.0.0.1:0", "--seconds", "280", "--pause", "90", log=tmp_path / "demo.stderr")
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


def test_the_story_in_order_and_the_printed_hq_commands_work(demo: Demo) -> None:
    demo.wait_line(r"^The story below repeats", 30)
    url = demo.wait_line(r"^  status page", 1).split()[-1].rstrip("/")
    commands = demo.commands()
    assert sorted(commands) == ["cmd", "publish-prices", "push-config", "status"]
    assert all(argv[0] == STORELINK for argv in commands.values())  # this venv's storelink, pasteable as printed
    demo.wait_line(r"^-- next round in", 90)  # round 1 told; the pause before round 2 is when we play head office

    status = _run(commands["status"])
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^store-demo\s+online\s+2\b", status.stdout, re.M) and "1 store(s)" in status.stdout

    published = _run(commands["publish-prices"])
    assert published.returncode == 0, published.stdout + published.stderr
    assert "COMMITTED version" in published.stdout
    item = _get(f"{url}/api/v1/prices/1003")
    assert item["regular_price"] == 79 and item["price"] == 79  # the store applied it

    ping = _run(commands["cmd"])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert json.loads(ping.stdout)["ok"] is True

    pushed = _run(commands["push-config"])
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    version = int(re.search(r"config version (\d+) for store-demo", pushed.stdout).group(1))  # type: ignore[union-attr]
    assert "store-demo: applied" in pushed.stdout
    assert _get(f"{url}/api/v1/status")["config"]["version"] == version

    # The demo's terminal says what head office's commands did to the store.
    demo.wait_line(r"^   \*  head office's price change v\d+ committed \(1 SKU\(s\) changed\)", 10)
    demo.wait_line(rf"^   \*  head office pushed config version {version}: the store says applied", 10)
    assert demo.stop() == 0

    at = 0
    for pattern in STORY:
        index = next((i for i in range(at, len(demo.lines)) if re.search(pattern, demo.lines[i])), None)
        assert index is not None, f"story step {pattern!r} missing or out of order:\n" + "\n".join(demo.lines)
        at = index + 1
    assert not [line for line in demo.lines if line.startswith("[head office]")], "raw JSON without --verbose"
    assert "Traceback" not in demo.stderr.read_text()


def test_a_status_page_port_in_use_is_one_line_naming_it_and_the_option(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([STORELINK, "demo", "--listen", f"127.0.0.1:{port}", "--seconds", "20"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"storelink demo: cannot listen on 127.0.0.1:{port}: address already in use (another program, or another "
        "StoreLink, is using it); change --listen (for example --listen 127.0.0.1:8081)")
    assert "Traceback" not in res.stderr


def test_a_broker_port_in_use_is_one_line_naming_it_and_the_option() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # something that accepts connections but is no MQTT broker
        port = busy.getsockname()[1]
        res = subprocess.run([STORELINK, "demo", "--broker-port", str(port), "--seconds", "20"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"storelink demo: cannot run the demo's broker on 127.0.0.1:{port}: address "
                                  "already in use; change --broker-port (or leave it out: a free port is picked)")


def test_verbose_adds_head_office_raw_messages(tmp_path: Path) -> None:
    d = Demo("--listen", "127.0.0.1:0", "--seconds", "6", "--verbose", log=tmp_path / "demo.stderr")
    assert d.proc.wait(60) == 0
    d._reader.join(5)
    assert any(line.startswith("[head office] storelink/store-demo/status  {") for line in d.lines)
    assert "gateway 0.1.0 running (store store-demo)" in d.stderr.read_text()  # the gateway's log too
