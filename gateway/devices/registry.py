"""Finds drivers through the ``storelink.drivers`` entry-point group and validates `[[devices]]` tables.

A retailer adds a driver by shipping a package whose entry point in that group names a ``Driver`` subclass;
nothing in StoreLink needs to change (the pattern of gpiozero's pin factories).
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from storelink.drivers.base import DeviceConfig, Driver

log = logging.getLogger(__name__)
GROUP = "storelink.drivers"


@functools.cache
def driver_names() -> list[str]:
    """Every installed driver's name, without importing any of them."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


@functools.cache
def load_driver(name: str) -> type[Driver] | None:
    """Import one driver; None (and an error logged once) when it is not installed or broken.

    Only the drivers a store's config names are imported: each module pulls in its own libraries (biip, evdev,
    gpiozero, python-escpos), and a gateway with two tills should not carry them (~17 MB for all of ours).
    """
    for ep in entry_points(group=GROUP, name=name):
        try:
            cls = ep.load()
        except Exception as err:  # a broken third-party driver must not stop the gateway
            log.error("driver entry point %s could not be loaded: %s", ep.name, err)
            return None
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            log.error("driver entry point %s does not name a Driver subclass", ep.name)
            return None
        return cls
    return None


def available_drivers() -> dict[str, type[Driver]]:
    """Every installed driver that loads, imported (for tools and tests; the gateway loads by name)."""
    return {name: cls for name in driver_names() if (cls := load_driver(name)) is not None}


def validate_device_tables(tables: list[Any]) -> tuple[list[DeviceConfig], list[str]]:
    """Validate each table with its driver's model. Returns (configs, problems); problems name the key."""
    from storelink.config import describe_validation_error

    configs: list[DeviceConfig] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    for i, table in enumerate(tables):
        if not isinstance(table, dict):
            continue  # the top-level model reports a `devices` entry that is not a table
        where = f"devices[{i}]"
        if isinstance(table.get("id"), str):
            where += f" (id={table['id']!r})"
            # Checked on the raw id, so a duplicate is reported even when the first table has other errors.
            if table["id"] in seen_ids:
                problems.append(f"{where}.id: duplicate device id {table['id']!r}")
            seen_ids.add(table["id"])
        name = table.get("driver")
        if not isinstance(name, str):
            problems.append(f"{where}.driver: required key is missing")
            continue
        cls = load_driver(name)
        if cls is None:
            if name in driver_names():
                problems.append(f"{where}.driver: driver {name!r} is installed but cannot be loaded (see the log)")
            else:
                known = ", ".join(driver_names()) or "none installed"
                problems.append(f"{where}.driver: unknown driver {name!r} (known: {known})")
            continue
        try:
            cfg = cls.config_model.model_validate(table)
        except ValidationError as err:
            problems += describe_validation_error(err, cls.config_model, where)
            continue
        configs.append(cfg)
    return configs, problems
