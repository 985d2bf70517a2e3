"""docs/storelink.example.toml, the annotated example a store starts from, is a valid config that covers every
section the gateway knows and one device of every driver, each explained by a comment; so it cannot rot."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from pydantic import BaseModel

from storelink.config import GatewayConfig, load_config
from storelink.devices.registry import driver_names
from storelink.validation import nested_model
from tests.helpers import STORELINK

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "storelink.example.toml"


def test_check_config_accepts_the_example() -> None:
    res = subprocess.run([STORELINK, "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{EXAMPLE}: ok (store store-0042, {len(driver_names())} devices)"


def _sections(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the config, and every key of its tables, down the nested models (mqtt, mqtt.tls, ...)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        inner = nested_model(field.annotation)
        if inner is not None and name != "devices":
            out += _sections(inner, f"{prefix}{name}.")
    return out


def test_every_section_of_the_config_is_in_the_example() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    tables = [k for k in _sections(GatewayConfig) if nested_model(_field(k).annotation) is not None]
    assert {"mqtt", "mqtt.tls", "storage", "http", "trust", "logging", "prices", "remote", "cart"} <= set(tables)
    for dotted in tables:
        node: object = data
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"[{dotted}] is missing from {EXAMPLE.name}"
            node = node[part]
    for key in GatewayConfig.model_fields:
        assert key in data, f"top-level key {key} is missing from {EXAMPLE.name}"


def _field(dotted: str) -> object:
    model: type[BaseModel] | None = GatewayConfig
    field = None
    for part in dotted.split("."):
        assert model is not None
        field = model.model_fields[part]
        model = nested_model(field.annotation)
    return field


def test_one_device_of_every_driver_with_a_comment_each() -> None:
    cfg = load_config(EXAMPLE)
    assert sorted({d.driver for d in cfg.device_configs}) == driver_names()
    lines = EXAMPLE.read_text().splitlines()
    for n, line in enumerate(lines):
        if line.startswith("[") and n > 0:
            assert lines[n - 1].startswith("#"), f"{line} has no comment saying what it is for"
    assert cfg.cart.printer in {d.id for d in cfg.device_configs if d.driver == "escpos_printer"}
