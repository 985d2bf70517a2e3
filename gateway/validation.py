"""The validation pieces every model shares: the strict base model, the id and SKU rules, readable errors.

Unknown keys are errors everywhere (``extra="forbid"``): a misspelt key that is silently ignored is how a store
ends up running with a default nobody chose, and a payload field nobody reads is a contract nobody wrote down.
Models are frozen: a validated config or payload is a value, not something a later step patches.

This module imports nothing from StoreLink, so every other module (drivers included) can build on it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Store ids, group ids, device ids and kiosk ids: they end up in MQTT topics and file names."""
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Sku = Annotated[str, Field(pattern=SKU_PATTERN)]
_ID = re.compile(ID_PATTERN)


class StrictModel(BaseModel):
    """The base of every config section and payload model: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def is_identifier(text: str) -> bool:
    """True when ``text`` is a valid store/device/kiosk id (for ids that arrive outside a model: URL paths)."""
    return _ID.fullmatch(text) is not None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def describe_validation_error(err: ValidationError) -> list[str]:
    """One line per problem, each naming the dotted key path: ``devices[0].port: required key is missing``."""
    problems = []
    for e in err.errors():
        key = _loc(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{key}: {msg}")
    return problems
