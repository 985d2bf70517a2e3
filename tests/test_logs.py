"""Journal logging over a real AF_UNIX socket in journald's native format, and secret redaction."""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.system.logs import RedactFilter, redact, setup_logging


def parse_journal(payload: bytes) -> dict[str, str]:
    """journald's parser, for the two forms a field can take."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(payload):
        nl = payload.index(b"\n", i)
        line = payload[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            size = int.from_bytes(payload[nl + 1 : nl + 9], "little")
            fields[line.decode()] = payload[nl + 9 : nl + 9 + size].decode()
            assert payload[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield path, sock
    for h in root.handlers[:]:
        if getattr(h, "_storelink", False):
            root.removeHandler(h)
            h.close()
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if fds:
        assert data == b""
        fd = fds[0]
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    return parse_journal(data)


def test_structured_fields_reach_the_journal(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    setup_logging("INFO", True, static_fields={"STORE_ID": "store-0042"}, journal_socket=path)
    log = logging.getLogger("storelink.test")
    log.debug("not at INFO")
    log.warning("scan accepted", extra={"device": "scanner0", "event_id": "01J9", "seq": 17})
    f = receive(sock)
    assert f["MESSAGE"] == "scan accepted"
    assert f["PRIORITY"] == "4"
    assert f["SYSLOG_IDENTIFIER"] == "storelink"
    assert f["STORE_ID"] == "store-0042"
    assert (f["DEVICE"], f["EVENT_ID"], f["SEQ"]) == ("scanner0", "01J9", "17")
    assert f["LOGGER"] == "storelink.test"
    assert f["CODE_FUNC"] == "test_structured_fields_reach_the_journal"


def test_traceback_is_multiline_field_and_redacted(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    setup_logging("INFO", True, journal_socket=path)
    try:
        raise ValueError("connect failed: password=hunter2")
    except ValueError:
        logging.getLogger("storelink.test").exception("uplink error")
    f = receive(sock)
    assert f["MESSAGE"].startswith("uplink error\nTraceback")
    assert "hunter2" not in f["MESSAGE"]
    assert f["EXCEPTION_TYPE"] == "ValueError"
    assert f["PRIORITY"] == "3"


def test_huge_record_goes_through_a_memfd(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    setup_logging("INFO", True, journal_socket=path)
    big = "x" * (1 << 20)  # larger than any datagram the kernel accepts by default
    logging.getLogger("storelink.test").info("blob %s", big)
    assert receive(sock)["MESSAGE"] == "blob " + big


def test_without_journal_plain_lines_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], journal: tuple[str, socket.socket]
) -> None:
    setup_logging("INFO", True, journal_socket=str(tmp_path / "no-journald-here"))
    logging.getLogger("storelink.test").info("printer online token=abc123", extra={"device": "printer1"})
    err = capsys.readouterr().err
    assert "INFO storelink.test: printer online token=[REDACTED] [device=printer1]" in err


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("mqtt connect password=hunter2 host=x", "hunter2"),
        ('{"username": "s42", "password": "p@ss word"}', "p@ss word"),
        ("cfg {'mqtt_password': 'Tr0ub4dor'}", "Tr0ub4dor"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def", "eyJhbGciOiJIUzI1NiJ9"),
        ("headers={'Authorization': 'Basic dXNlcjpwYXNz'}", "dXNlcjpwYXNz"),
        ("http token: 0123456789abcdef0123", "0123456789abcdef0123"),
        ("api_key=AKIAIOSFODNN7EXAMPLE&x=1", "AKIAIOSFODNN7EXAMPLE"),
        ("broker mqtts://store42:s3cr3t@broker.example:8883", "s3cr3t"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----", "MIIEvQIBADANBg"),
        ("key file starts -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI", "MHcCAQEEI"),
        ("loyalty customer jane.doe@example.com scanned", "jane.doe@example.com"),
        ("card 4111 1111 1111 1111 declined", "4111 1111 1111 1111"),
        ("card 5500-0000-0000-0004", "5500-0000-0000-0004"),
    ],
)
def test_redact_removes_secrets(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "[REDACTED" in out


@pytest.mark.parametrize(
    "text",
    [
        "scan 4006381333931 from scanner0",  # an EAN-13 stays readable
        "seq 1234567 delivered; outbox depth 12",
        "token bucket refilled",  # the word alone is not a secret
    ],
)
def test_redact_leaves_ordinary_text(text: str) -> None:
    assert redact(text) == text


def test_filter_scrubs_args_and_extra() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "login %s as %s", ("password=pw1", "store"), None
    )
    record.detail = "Authorization: Bearer abcdefghijkl"
    assert RedactFilter().filter(record)
    assert record.getMessage() == "login password=[REDACTED] as store"
    assert "abcdefghijkl" not in record.detail
