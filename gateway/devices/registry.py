"""Finds drivers through the ``storelink.drivers`` entry-point group and validates `[[devices]]` tables.

A retailer adds a driver by shipping a package whose entry point in that group names a ``Driver`` subclass;
nothing in StoreLink needs to change (the pattern of gpiozero's pin factories). Only the drivers a config names
are imported, and a driver's own libraries (evdev, gpiozero, python-escpos, pyserial) come with optional extras:
a config that uses a driver whose extra is missing is refused with one line naming the extra.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from storelink.drivers.base import DeviceConfig, Driver, Requirement, price_target_problem
from storelink.validation import describe_validation_error

log = logging.getLogger(__name__)
GROUP = "storelink.drivers"


class DriverUnavailable(Exception):
    """A driver that is not installed, or installed but unusable; the message says which and why."""


@functools.cache
def driver_names() -> list[str]:
    """Every installed driver's name, without importing any of them."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


@functools.cache
def _load(name: str) -> type[Driver] | str:
    for ep in entry_points(group=GROUP, name=name):
        try:
            cls = ep.load()
        except Exception as err:  # a broken third-party driver must not stop the gateway
            log.error("driver entry point %s could not be loaded: %s", ep.name, err)
            return f"driver {name!r} is installed but cannot be loaded: {type(err).__name__}: {err}"
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            return f"driver {name!r} does not name a Driver subclass (entry point {ep.value})"
        problem = price_target_problem(cls)
        if problem is not None:
            return f"driver {name!r} {problem}"
        return cls
    known = ", ".join(driver_names()) or "none installed"
    return f"unknown driver {name!r} (known: {known})"


def load_driver(name: str) -> type[Driver]:
    """Import one driver (once); DriverUnavailable when it is not installed or broken.

    Only the drivers a store's config names are imported: each module pulls in its own libraries, and a gateway
    with two tills should not carry them (~17 MB for all of ours)."""
    found = _load(name)
    if isinstance(found, str):
        raise DriverUnavailable(found)
    return found


def available_drivers() -> dict[str, type[Driver]]:
    """Every installed driver that loads, imported (for tools and tests; the gateway loads by name)."""
    return {name: cls for name in driver_names() if not isinstance(cls := _load(name), str)}


def missing_requirement(requirements: tuple[Requirement, ...]) -> tuple[Requirement, str] | None:
    """The first of these libraries that is not installed, with a readable reason; None when all are."""
    for req in requirements:
        try:
            found = importlib.util.find_spec(req.module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or broken
            found = False
        if not found:
            return req, f"module {req.module} is not installed"
    return None


def validate_device_tables(tables: list[Any]) -> tuple[list[DeviceConfig], list[str]]:
    """Validate each table with its driver's model. Returns (configs, problems); problems name the key."""
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
        try:
            cls = load_driver(name)
        except DriverUnavailable as err:
            problems.append(f"{where}.driver: {err}")
            continue
        # The driver's own libraries first (its validators may use them), then what this device's settings add.
        missing = missing_requirement(cls.requires)
        if missing is None:
            try:
                cfg = cls.config_model.model_validate(table)
            except ValidationError as err:
                problems += describe_validation_error(err, cls.config_model, where)
                continue
            missing = missing_requirement(cls.requirements(cfg))
        if missing is not None:
            req, why = missing
            problems.append(f"{where}.driver: {name} needs the extra {req.pip_name} "
                            f"(pip install '{req.pip_name}'): {why}")
            continue
        configs.append(cfg)
    return configs, problems
