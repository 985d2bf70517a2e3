"""Central price changes, applied to tills and shelf labels in one atomic step (docs/prices.md).

``install(gateway)`` (listed in gateway.app.PART_INSTALLERS) wires the part: the price book as the service
``"prices"``, the MQTT intake for batches and the desired version, the two-phase coordinator, the audit, the
retained ``prices/state`` and the "prices" section of the status API. Module map:

- models.py: `[prices]` config and every payload; staging.py + intake.py: verify and reassemble batches;
- db.py: the SQLite schema; book.py: lookups and the book's SQL; coordinator.py: the two-phase journal;
- audit.py: stale tills and drift; state.py: the retained report; hq.py: the head-office command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storelink.app import Gateway


def install(gateway: Gateway) -> None:
    from storelink.prices.http import install_routes
    from storelink.prices.part import PricesPart

    part = PricesPart(gateway)
    install_routes(part)
    gateway.services["prices"] = part.book
    gateway.services["price_coordinator"] = part
    gateway.status_parts["prices"] = lambda: part.state.latest
    gateway.parts.append(("prices", part.run))
