"""Logging for an unattended appliance: structured records to the systemd journal, secrets never logged.

Under systemd the records go over journald's native protocol (datagrams of ``KEY=value`` fields on
``/run/systemd/journal/socket``), so ``journalctl -u storelink STORE_ID=store-0042 DEVICE=scanner0`` works and
no python-systemd/libsystemd build is needed. Fields come from the record's ``extra``: ``log.info("scan",
extra={"device": "scanner0", "event_id": eid, "seq": 7})`` gives ``DEVICE=``, ``EVENT_ID=``, ``SEQ=``.
Elsewhere (a developer's terminal, tests) it is one plain line per record on stderr.

:class:`RedactFilter` runs on every handler and scrubs passwords, tokens, private keys, Authorization headers,
credentials in URLs, payment card numbers and e-mail addresses, in the message, the arguments, the traceback
and string ``extra`` fields: a log line copied into a support ticket must not leak a store's secrets or a
customer.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import sys
import traceback

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "storelink"

# Attributes every LogRecord has; anything else on a record came from `extra=` and becomes a journal field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_FIELD_RE = re.compile(r"[A-Z0-9][A-Z0-9_]*")

_SECRET_KEYS = (
    r"(?:password|passwd|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)"
)
_REDACTIONS: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys, whole block (also a truncated one that has no END line).
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S),
        "[REDACTED PRIVATE KEY]",
    ),
    # HTTP Authorization / Proxy-Authorization headers, in "Header: value" or dict-repr form.
    (re.compile(r"((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,}]+", re.I), r"\1[REDACTED]"),
    (re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.I), r"\1 [REDACTED]"),
    # key=value, key: value, "key": "value" and key='value' for secret-looking keys (db_password, mqtt_token...).
    (
        re.compile(
            rf"(\b[\w.-]*{_SECRET_KEYS}[\w-]*['\"]?\s*[:=]\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;&}}\]]+)",
            re.I,
        ),
        r"\1[REDACTED]",
    ),
    # user:password@ in URLs (mqtts://store:hunter2@broker).
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@/\s]+@", re.I), r"\1[REDACTED]@"),
    # Customer data: e-mail addresses.
    (re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), "[REDACTED EMAIL]"),
]
# 13-19 digits, optionally grouped by spaces or dashes, checked with Luhn so GTINs/EANs (which are not
# Luhn-valid as a rule, and are 8-14 digits) mostly stay readable.
_PAN_RE = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_pan(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if len(digits) < 13 or not _luhn_ok(digits):
        return match.group(0)
    return "[REDACTED PAN]"


def redact(text: str) -> str:
    """``text`` with secrets and customer identifiers replaced by ``[REDACTED ...]`` markers."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return _PAN_RE.sub(_mask_pan, text)


_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")


def loggable_id(value: object) -> str:
    """``value`` if it is an identifier (a device id, a batch id, a command name: no spaces, no '@', at most 128
    characters), else a placeholder. Input is echoed into the log only through this, so a field that should have
    been an id but carried a customer's name or a secret never reaches the journal."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    return "<not an id>"


def exception_summary(exc: BaseException) -> str:
    """What failed and where, without the exception's message: exception types and code locations only. A message
    may quote the input being processed (a request body, a sale, a header), which must not reach the log."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)[-3:]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))
        parts.append(f"{type(current).__name__}" + (f" at {where}" if where else ""))
        current = current.__cause__ or current.__context__
    return "; caused by ".join(parts)


class RedactFilter(logging.Filter):
    """Scrubs a record in place (so every handler and formatter after it sees the clean text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_storelink_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must still produce a log line, not lose it
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        record._storelink_redacted = True
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRS or key.startswith("_") or value is None:
            continue
        name = key.upper().replace("-", "_")
        # Journal field names: upper case, digits, '_', not starting with '_' (those are trusted fields).
        if _FIELD_RE.fullmatch(name) and len(name) <= 64:
            fields[name] = str(value)
    return fields


_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def encode_journal_fields(fields: dict[str, str]) -> bytes:
    """journald's native format: ``KEY=value\\n``, or ``KEY\\n<u64 le length><value>\\n`` for multi-line."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record as one datagram to journald; falls back to a memfd for records too big for one."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, static_fields: dict[str, str] | None = None):
        super().__init__()
        self.socket_path = socket_path
        self.static_fields = {"SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER, **(static_fields or {})}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            message += "\n" + record.exc_text
        if record.stack_info:
            message += "\n" + record.stack_info
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(_priority(record.levelno)),
            **self.static_fields,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
            "SYSLOG_PID": str(os.getpid()),
        }
        if record.exc_info and record.exc_info[0] is not None:
            fields["EXCEPTION_TYPE"] = record.exc_info[0].__name__
        fields.update(_extra_fields(record))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(encode_journal_fields(self.fields(record)))
        except Exception:
            self.handleError(record)

    def send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.socket_path)
        except OSError as err:
            if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for one datagram
                raise
            # journald accepts a sealed memfd passed over the socket for large entries.
            fd = os.memfd_create("storelink-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.write(fd, payload)
                with contextlib.suppress(OSError):  # sealing is what journald prefers, not what it requires
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
                # (socket.send_fds drops the address argument on 3.11, so build the SCM_RIGHTS message here.)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
                self._sock.sendmsg([], rights, 0, self.socket_path)
            finally:
                os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


class PlainFormatter(logging.Formatter):
    """One line: ``[time] LEVEL logger: message key=value...``; the time is left out when journald adds it."""

    def __init__(self, with_time: bool) -> None:
        fmt = ("%(asctime)s " if with_time else "") + "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k.lower()}={v}" for k, v in _extra_fields(record).items())
        if extras:
            first, nl, rest = line.partition("\n")
            line = f"{first} [{extras}]{nl}{rest}"
        return line


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=dev:inode of the stream it connected our stderr to.
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def journal_available(socket_path: str = JOURNAL_SOCKET) -> bool:
    return os.path.exists(socket_path)


def setup_logging(
    level: str,
    journal: bool,
    *,
    static_fields: dict[str, str] | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Configure the root logger once for the process (idempotent: replaces handlers it installed before).

    ``static_fields`` (e.g. ``{"STORE_ID": "store-0042"}``) are added to every journal entry.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_storelink", False):
            root.removeHandler(old)
            old.close()
    handler: logging.Handler
    if journal and journal_available(journal_socket):
        handler = JournalHandler(journal_socket, static_fields)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter(with_time=not _stderr_is_journal()))
    handler.addFilter(RedactFilter())
    handler._storelink = True  # type: ignore[union-attr]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that chatter at INFO about every connection would drown the journal of a years-long process.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
