"""`storelink demo` part: the demo store's price list and the `[prices]` timings that let a change be watched.

Head office (drivers/sim/demo_hq.py) installs DEMO_ITEMS as the first price list; each round of the story then
raises one price and lowers another (PRICE_SWINGS), and the console shows what a till's LOOKUP answers while the
labels confirm: min(old, new), never more than the shelf shows, until every label shows the new price.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_ITEMS = [
    {"sku": "1001", "gtin": "4006381333931", "price": 199, "unit_price": 199, "unit_basis": "l",
     "description": "Oat milk 1 l"},
    {"sku": "1002", "gtin": "4006381333948", "price": 349, "description": "Dark chocolate 100 g",
     "unit_price": 349, "unit_basis": "100g"},
    {"sku": "1003", "gtin": "4006381333955", "price": 89, "description": "Sparkling water 0.5 l"},
    {"sku": "1004", "gtin": "4006381333962", "price": 1299, "description": "Olive oil 750 ml"},
]
# SKU -> the two prices it swings between, round after round (one goes up while the other goes down).
PRICE_SWINGS = {"1001": (199, 249), "1002": (349, 299)}


def prepare(cfg: dict[str, Any], _workdir: Path) -> None:
    cfg["prices"] = {"prepare_deadline": 30.0, "confirm_poll": 0.5, "stale_check": 2.0, "abort_hold": 10.0}


def swing(sku: str, now: int | None) -> int:
    """The other price of `sku`'s pair (the first one when the store has neither)."""
    first, second = PRICE_SWINGS[sku]
    return second if now == first else first
