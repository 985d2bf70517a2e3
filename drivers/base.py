"""The driver interface every device driver implements, and the base of every driver's config model.

A driver is a class with a pydantic ``config_model`` and an async ``run()`` that works until it is cancelled.
When ``run()`` raises, the supervisor records the error, marks the device offline and starts it again with
backoff; a driver never has to keep itself alive and can never take the gateway down.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


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
    def changed(self) -> list[PriceItem]: ...  # items whose shown/charged price differs from the active version
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
    price_role: str  # "till" (charges prices) or "label" (shows prices: ESL, printed shelf labels)

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
    """A till. `price_can_hold` says whether the connected till takes HOLD/FINAL (its own price table is then
    capped at the transition prices); a till that cannot is committed only once the labels show the new prices
    when the change raises a price (it keeps the old, lower price meanwhile)."""

    @property
    def price_can_hold(self) -> bool | None:
        """True/False for a connected till (what it said in HELLO), None when it is not connected."""
        ...

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
