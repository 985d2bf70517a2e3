"""The driver interface every device driver implements, and the base of every driver's config model.

A driver is a class with a pydantic ``config_model`` and an async ``run()`` that works until it is cancelled.
When ``run()`` raises, the supervisor records the error, marks the device offline and starts it again with
backoff; a driver never has to keep itself alive and can never take the gateway down.
"""

from __future__ import annotations

import abc
import enum
import errno
import os
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _port_is_a_number(value: Any) -> Any:
    if isinstance(value, str):  # pydantic would quietly turn "8883" into 8883: a quoted number is a typo here
        hint = f"write {value.strip()} without quotes" if value.strip().isdigit() else "1 to 65535"
        raise ValueError(f"a TCP port is a number, not the string {value!r} ({hint})")
    return value


# A TCP port in any config (the broker's, a printer's): an integer 1..65535; a string or a float is an error.
TcpPort = Annotated[int, BeforeValidator(_port_is_a_number), Field(ge=1, le=65535, strict=True)]


# Network errors whose text asyncio replaces with "Connect call failed ('10.0.0.5', 9100)": the OS's words instead.
_LINK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                errno.ENETUNREACH, errno.EHOSTDOWN, errno.EPIPE}
_ERRNO_TAG = re.compile(r"\[Errno -?\d+\] ")


def plain_error(err: BaseException) -> str:
    """A device fault in words for store staff and the log: one line, no exception class name, no errno number
    ("connection refused", "no such file or directory: /dev/ttyUSB0", a driver's own message as it is)."""
    if isinstance(err, OSError) and err.errno in _LINK_ERRNOS:
        text = os.strerror(err.errno).lower()
    elif isinstance(err, OSError) and err.errno and err.filename:
        text = f"{os.strerror(err.errno).lower()}: {err.filename}"
    elif isinstance(err, TimeoutError) and not str(err):
        text = "no answer in time"
    else:
        text = str(err) or re.sub(r"(?<!^)(?=[A-Z])", " ", type(err).__name__).lower()
    return " ".join(_ERRNO_TAG.sub("", text).split())


class DeviceConfig(BaseModel):
    """Fields every `[[devices]]` table has; a driver's model subclasses this and adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=DEVICE_ID_RE, description="stable device id, used in topics")
    driver: str
    enabled: bool = True


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class EventRef(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...


class DeviceContext(Protocol):
    """What the gateway offers a running driver."""

    store_id: str
    device_id: str

    async def emit(self, kind: str, data: dict[str, Any]) -> EventRef:
        """Put an event in the durable outbox; returns once it is on disk."""
        ...

    def set_health(self, state: Health, error: str | None = None) -> None: ...

    def seen(self) -> None:
        """The device showed a sign of life (a scan, a status answer)."""
        ...

    def service(self, name: str) -> Any:
        """A gateway service by name (for example "prices" for the price book), or KeyError."""
        ...

    def watch_thread(self, name: str, max_silence: float) -> Callable[[], None]:
        """Put a driver thread under the gateway's systemd watchdog; returns its ``beat()``.

        The thread calls ``beat()`` on every round, idle ones included (a read that timed out). A thread silent
        for ``max_silence`` seconds is hung (a USB serial driver stuck in the kernel cannot be cancelled), so the
        gateway stops its watchdog pings and systemd restarts it. Call ``unwatch_thread(name)`` when the thread
        ends on purpose.
        """
        ...

    def unwatch_thread(self, name: str) -> None: ...


class Driver(abc.ABC):
    config_model: ClassVar[type[DeviceConfig]]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        self.config = config
        self.ctx = ctx

    @abc.abstractmethod
    async def run(self) -> None:
        """Drive the device until cancelled. Raise to report a failure (the supervisor restarts it).

        Report health with ``ctx.set_health``: the supervisor marks a device OFFLINE while it (re)starts and
        after a failure, so a driver says OK itself once the device answers.
        """

    def details(self) -> dict[str, Any]:
        """Driver-specific facts for the status API (peer address, counters, last file written). JSON-able."""
        return {}


# -- price targets ---------------------------------------------------------------------------------------------
# Drivers that show or charge prices (tills, shelf-label systems, label printers) implement PriceTarget; the
# price coordinator (gateway/prices) drives them through a two-phase change. Every method must be idempotent:
# after a crash the coordinator re-drives the decision in its journal, so commit/abort may arrive twice.


class PriceItem(Protocol):
    @property
    def sku(self) -> str: ...
    @property
    def gtin(self) -> str | None: ...
    @property
    def price(self) -> int: ...  # minor units (cents)
    @property
    def unit_price(self) -> int | None: ...  # minor units per unit_basis
    @property
    def unit_basis(self) -> str | None: ...  # for example "kg", "l", "100g"
    @property
    def description(self) -> str: ...


class PriceChange(Protocol):
    @property
    def version(self) -> int: ...
    @property
    def batch_id(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def changed(self) -> list[PriceItem]: ...  # items whose shown/charged price differs from the active version


class PrepareFailed(Exception):
    """A target cannot take this change; the coordinator aborts it everywhere and reports the reason."""


class PriceTarget(Protocol):
    price_role: str  # "till" (charges prices) or "label" (shows prices: ESL, printed shelf labels)

    async def price_prepare(self, change: PriceChange) -> None:
        """Stage (tills) or render and push/print (labels) the change; raise PrepareFailed when impossible."""
        ...

    async def price_commit(self, version: int) -> None:
        """Switch to `version` (tills); labels: nothing to switch, the content is already on its way."""
        ...

    async def price_abort(self, version: int) -> None:
        """Drop a staged `version` (tills) / put the old content back (labels)."""
        ...

    async def price_confirmed(self, version: int) -> bool:
        """True once the device provably runs/shows `version` (tills: committed; labels: tag/print confirmed)."""
        ...

    async def price_reported_version(self) -> int | None:
        """The version the device itself reports (for reconciliation); None when it cannot tell."""
        ...


@runtime_checkable
class LabelProgress(Protocol):
    """Optional for label targets: how far a price version has got onto the shelf. While labels confirm, the
    status page shows "labels left" from it (the coordinator asks while it waits for `price_confirmed`)."""

    async def price_labels_left(self, version: int) -> tuple[int, int]:
        """(labels that do not show `version` yet, labels `version` changes on this device)."""
        ...
