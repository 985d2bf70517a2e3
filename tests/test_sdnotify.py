"""sd_notify against a real AF_UNIX datagram socket, as systemd would bind it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.system import sdnotify
from tests.systemd_helpers import NotifyListener


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    lst = NotifyListener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield lst
    lst.close()


def test_notify_sends_one_datagram(listener: NotifyListener) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=up")
    listener.wait_count("READY=1", 1, timeout=2)
    assert listener.texts() == ["READY=1\nSTATUS=up"]


def test_helpers_send_the_protocol_keys(listener: NotifyListener) -> None:
    assert sdnotify.ready("config loaded")
    assert sdnotify.status("uplink connected\nsecond line")
    assert sdnotify.stopping()
    listener.wait_count("STOPPING=1", 1, timeout=2)
    assert listener.texts() == [
        "READY=1\nSTATUS=config loaded",
        "STATUS=uplink connected second line",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@storelink-test-{uuid.uuid4().hex}"
    with NotifyListener(name) as lst:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.notify("WATCHDOG=1")
        lst.wait_count("WATCHDOG=1", 1, timeout=2)


def test_unset_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_missing_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.notify("READY=1") is False


def test_full_socket_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A receiver that never reads: its queue fills, and notify must give up instead of hanging the caller.
    path = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
        stuck.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        results = [sdnotify.notify("WATCHDOG=1") for _ in range(2000)]
    assert results[0] is True
    assert results[-1] is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    # Inherited by a child: the watchdog is meant for another process.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "garbage")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
