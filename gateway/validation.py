"""The validation pieces every model shares: the strict base model, the id and SKU rules, readable errors.

Unknown keys are errors everywhere (``extra="forbid"``): a misspelt key that is silently ignored is how a store
ends up running with a default nobody chose, and a payload field nobody reads is a contract nobody wrote down.
Models are frozen: a validated config or payload is a value, not something a later step patches.

This module imports nothing from StoreLink, so every other module (drivers included) can build on it.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Store ids, group ids, device ids and kiosk ids: they end up in MQTT topics and file names."""
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Sku = Annotated[str, Field(pattern=SKU_PATTERN)]
_ID = re.compile(ID_PATTERN)


def _port_is_a_number(value: Any) -> Any:
    if isinstance(value, str):  # pydantic would quietly turn "8883" into 8883: a quoted number is a typo here
        hint = f"write {value.strip()} without quotes" if value.strip().isdigit() else "1 to 65535"
        raise ValueError(f"a TCP port is a number, not the string {value!r} ({hint})")
    return value


TcpPort = Annotated[int, BeforeValidator(_port_is_a_number), Field(ge=1, le=65535, strict=True)]
"""A TCP port in any config (the broker's, a printer's): an integer 1..65535; a string or a float is an error."""


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


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`TlsConfig | None`, `list[X]`), if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := nested_model(arg)) is not None:
            return found
    return None


def _keys_beside(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The keys `model` accepts in the table that holds `loc` (for "did you mean"); [] when unknown."""
    current = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list's item model was already taken from its annotation
        field = current.model_fields.get(part) if current is not None else None
        current = nested_model(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def describe_validation_error(err: ValidationError, model: type[BaseModel] | None = None,
                              where: str = "") -> list[str]:
    """One line per problem, each naming the dotted key path (``devices[0].port: required key is missing``), in
    words a store's installer can act on. With the model that was validated, an unknown key also names the
    closest key it knows (a typo's likely fix). `where` is the path of the validated table itself
    (``devices[0] (id='till-1')``)."""
    problems = []
    for e in err.errors():
        inner = _loc(tuple(e["loc"])) if e["loc"] else ""
        key = f"{where}.{inner}" if where and inner else (where or inner or "(top level)")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_beside(model, tuple(e["loc"])), n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        elif e["type"] == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == ID_PATTERN:
            msg = "must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or a digit"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our own validators' text, without pydantic's label
        problems.append(f"{key}: {msg}")
    return problems
