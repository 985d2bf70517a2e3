"""The driver interface every device driver implements, and the base of every driver's config model.

A driver is a class with a pydantic ``config_model`` and an async ``run()`` that works until it is cancelled.
When ``run()`` raises, the supervisor records the error, marks the device offline and starts it again with
backoff; a driver never has to keep itself alive and can never take the gateway down.

``Driver`` is the extension point: a retailer's driver subclasses it and is found through the
``storelink.drivers`` entry-point group (storelink.devices.registry). What the gateway lends a running driver is
the typed ``DeviceContext``: its data directory, the storage sync mode, a view of the price book and of the
kiosk sessions, the watchdog; never the gateway itself.
"""

from __future__ import annotations

import abc
import enum
import errno
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from storelink.validation import Identifier, StrictModel

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


class DeviceConfig(StrictModel):
    """Fields every `[[devices]]` table has; a driver's model subclasses this and adds its own."""

    id: Identifier = Field(description="stable device id, used in topics")
    driver: str
    enabled: bool = True


@dataclass(frozen=True)
class Requirement:
    """A library a driver needs that an optional extra of a distribution installs (pyproject.toml).

    Checked with ``importlib.util.find_spec(module)`` when a config is validated, without importing the library:
    a store that uses the driver without the extra gets one line naming the extra and the pip command."""

    module: str  # the top-level import name: "evdev", "gpiozero", "escpos", "serial"
    extra: str  # "hid" for pip install 'storelink[hid]'
    distribution: str = "storelink"

    @property
    def pip_name(self) -> str:
        return f"{self.distribution}[{self.extra}]"


PYSERIAL = Requirement("serial", "scanners")  # serial scanners, and printers on a serial connection


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class EventRef(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...


class PriceBookView(Protocol):
    """What drivers read from the store's price book (gateway/prices/book.py PriceBook)."""

    @property
    def active_version(self) -> int: ...  # 0 while no price list is in force

    def is_stale(self, device_id: str) -> bool:
        """True while a till is behind the active version (it must be brought up to date before it sells)."""
        ...

    def version_for(self, device_id: str) -> int:
        """The version a till should run now: the active one, or an older one while its COMMIT is held back (a
        till without holds is committed to a price increase only once the labels show it)."""
        ...

    async def alookup(self, code: str) -> dict[str, Any] | None:
        """The price to charge for a SKU or GTIN (min(old, new) during a transition), or None."""
        ...

    def iter_items(self) -> Iterable[PriceItem]:
        """Every item in force (blocking: call it from a thread)."""
        ...


class KioskView(Protocol):
    """What a kiosk device drives in the kiosk sessions (gateway/kiosk/sessions.py KioskSessions)."""

    def active(self, kiosk_id: str) -> bool: ...

    async def session_started(self, kiosk_id: str) -> str: ...

    async def session_ended(self, kiosk_id: str, reason: str = "stepped_off") -> None: ...


SyncMode = Literal["FULL", "NORMAL"]


class DeviceContext(Protocol):
    """What the gateway offers a running driver: typed fields, nothing else of the gateway."""

    @property
    def store_id(self) -> str: ...

    @property
    def device_id(self) -> str: ...

    @property
    def data_dir(self) -> Path:
        """Where a driver keeps its own files (queues, state databases): beside the outbox."""
        ...

    @property
    def storage_sync(self) -> SyncMode:
        """The store's ``[storage] synchronous``: a driver's own SQLite files use the same durability."""
        ...

    @property
    def prices(self) -> PriceBookView | None:
        """The price book, or None on a gateway without one (read at each use: it may come and go)."""
        ...

    @property
    def kiosk(self) -> KioskView | None:
        """The kiosk sessions, or None when this gateway runs none (no kiosk device and no [cart])."""
        ...

    async def emit(self, kind: str, data: dict[str, Any]) -> EventRef:
        """Put an event in the durable outbox; returns once it is on disk."""
        ...

    def set_health(self, state: Health, error: str | None = None) -> None: ...

    def seen(self) -> None:
        """The device showed a sign of life (a scan, a status answer)."""
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
    requires: ClassVar[tuple[Requirement, ...]] = ()  # libraries from an extra; see requirements()
    price_role: ClassVar[Literal["till", "label"] | None] = None  # set by drivers that implement PriceTarget
    uses_kiosk_sessions: ClassVar[bool] = False  # the gateway runs kiosk sessions only when a device needs them

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        self.config = config
        self.ctx = ctx

    @classmethod
    def requirements(cls, config: DeviceConfig) -> tuple[Requirement, ...]:
        """The libraries this device needs; a driver whose needs depend on its config (a connection) overrides it."""
        return cls.requires

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
#
# The founding promise is that a till never charges more than the shelf shows. Labels change late (a tag checks
# in, a label is printed and swapped), so from the moment labels may change until each one is known to show the
# price in force, a till charges min(old, new) for the items of the change: `transition_prices`. Tills get them
# through TillPriceTarget.price_hold / price_commit and are released by price_final; label targets say what they
# are known to show per item (LabelPriceTarget.price_label_states).


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
    def changed(self) -> Sequence[PriceItem]: ...  # items whose shown/charged price differs from the active version
    @property
    def transition_prices(self) -> Mapping[str, int]:
        """SKU -> what a till may charge at most while the labels change: min(old, new) (tills only)."""
        ...
    @property
    def effective_at(self) -> float | None:
        """Unix time the change takes effect (None: at once). Labels that can show a valid-from (paper labels
        printed ahead, marked with it) prepare ahead; labels that cannot (ESL) change at price_commit."""
        ...


class PrepareFailed(Exception):
    """A target cannot take this change; the coordinator aborts it everywhere and reports the reason."""


class PriceTarget(Protocol):
    @property
    def price_role(self) -> Literal["till", "label"] | None: ...  # "till" charges prices, "label" shows them

    async def price_prepare(self, change: PriceChange) -> None:
        """Stage (tills) or render and push/print (labels) the change; raise PrepareFailed when impossible."""
        ...

    async def price_commit(self, version: int) -> None:
        """Switch to `version` (tills: at most the transition prices until price_final); labels: nothing to
        switch for content already on its way, or push content held back for a scheduled change."""
        ...

    async def price_abort(self, version: int) -> None:
        """Drop a staged `version` (tills: the holds stay until price_final) / put the old content back (labels:
        recorded durably and delivered by the driver when the device is reachable again)."""
        ...

    async def price_confirmed(self, version: int) -> bool:
        """True once the device provably runs/shows `version` (tills: committed; labels: tag/print confirmed)."""
        ...

    async def price_reported_version(self) -> int | None:
        """The version the device itself reports (for reconciliation); None when it cannot tell."""
        ...


class TillPriceTarget(PriceTarget, Protocol):
    """A till. `price_can_hold` says whether it keeps holds (HoldingTillTarget: its own price table is capped at
    the transition prices); a till that cannot (an older till, a POS that imports price files) is committed only
    once the labels show the new prices when the change raises a price (it keeps the old, lower price meanwhile)."""

    @property
    def price_can_hold(self) -> bool | None:
        """True/False (for a till that connects: what it said in HELLO), None when it is not connected."""
        ...


@runtime_checkable
class HoldingTillTarget(TillPriceTarget, Protocol):
    """A till that can keep holds (it is sent these only while its `price_can_hold` is True)."""

    async def price_hold(self, version: int) -> None:
        """From now on charge at most the staged version's transition prices (before any label changes)."""
        ...

    async def price_final(self, version: int, keep: list[str]) -> None:
        """The labels show `version`'s outcome: drop its holds except for the SKUs in `keep`."""
        ...


LabelShows = Literal["new", "old", "unknown"]
"""What a label is known to display for an item of a version: that version's content, the content from before
it, or either (a print job that may have reached the printer, a device that is gone)."""


class LabelPriceTarget(PriceTarget, Protocol):
    async def price_label_states(self, version: int) -> dict[str, LabelShows]:
        """For every SKU of `version` this device carries a label for: what that label is known to show now."""
        ...

    async def price_restored(self, version: int) -> bool:
        """After price_abort(version): True once every label of the version is known to show its old content."""
        ...

    async def price_reprint(self, request_id: str, change: PriceChange) -> int:
        """Print/push the labels of `change.changed` again as a job of its own (at-least-once, like printing),
        even where the device already shows them; returns how many labels were queued."""
        ...


PRICE_TARGET_METHODS = ("price_prepare", "price_commit", "price_abort", "price_confirmed", "price_reported_version")
ROLE_METHODS = {"till": (), "label": ("price_label_states", "price_restored", "price_reprint")}
HOLD_METHODS = ("price_hold", "price_final")  # a till has both (HoldingTillTarget) or neither


def price_target_problem(cls: type[Driver]) -> str | None:
    """Why a driver class that declares a ``price_role`` does not implement PriceTarget (and TillPriceTarget or
    LabelPriceTarget for its role), or None when it does.

    Checked when the driver is loaded, so the price coordinator can rely on the protocol instead of probing."""
    if cls.price_role is None:
        return None
    if cls.price_role not in ("till", "label"):
        return f"price_role must be 'till' or 'label', not {cls.price_role!r}"
    role = ROLE_METHODS[cls.price_role]
    if cls.price_role == "till" and any(hasattr(cls, m) for m in HOLD_METHODS):
        role = HOLD_METHODS
    for protocol, methods in (("PriceTarget", PRICE_TARGET_METHODS),
                              ("HoldingTillTarget" if cls.price_role == "till" else "LabelPriceTarget", role)):
        missing = [m for m in methods if not inspect.iscoroutinefunction(getattr(cls, m, None))]
        if missing:
            return f"declares price_role {cls.price_role!r} but has no async {', '.join(missing)} ({protocol})"
    if cls.price_role == "till" and not isinstance(getattr(cls, "price_can_hold", None), property):
        return "declares price_role 'till' but has no property price_can_hold (TillPriceTarget)"
    return None


@runtime_checkable
class TagStateReporting(Protocol):
    """A label target that reports each tag's confirmed content (the reconciliation audit compares them)."""

    async def tag_states(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class LabelProgress(Protocol):
    """Optional for label targets: how far a price version has got onto the shelf. While labels confirm, the
    status page shows "labels left" from it (the coordinator asks while it waits for `price_confirmed`)."""

    async def price_labels_left(self, version: int) -> tuple[int, int]:
        """(labels that do not show `version` yet, labels `version` changes on this device)."""
        ...
