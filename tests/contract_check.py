"""Every message a test's head office receives is checked against the MQTT contract (storelink.contract).

The shared subscribers (tests.helpers.Subscriber, tests.hq_helpers.HeadOffice, the kiosk cart's head office) hand
each message to ``check_*`` here from paho's thread; problems are collected, and conftest's autouse fixture fails
the test that received them. So the whole suite proves that what the gateway publishes matches the models.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ValidationError

from storelink.contract import CartRequest, CommandResponse, EventPayload, Topics, uplink_payloads

# Any prefix, any store: "+/+/status", "+/+/events/+", ...
_UPLINK = uplink_payloads(Topics("+", "+"))
# Retained latest-state topics: an empty message clears one (a removed device, a test cleaning up).
_CLEARABLE = {f for f, model in _UPLINK if model.__name__ != "EventPayload"} - {Topics("+", "+").cart_request}

_lock = threading.Lock()
violations: list[str] = []
checked = 0


def _record(ok: bool, problem: str = "") -> None:
    global checked
    with _lock:
        checked += 1
        if not ok:
            violations.append(problem)


def _validate(topic: str, payload: bytes, model: type[BaseModel]) -> BaseModel | None:
    try:
        parsed = model.model_validate_json(payload)
    except ValidationError as err:
        _record(False, f"{topic}: not a {model.__name__}: {err.errors()[0]}: {payload[:300]!r}")
        return None
    _record(True)
    return parsed


def check(topic: str, payload: bytes) -> None:
    """A message seen on a store's topics: validated when it is one the gateway publishes."""
    for topic_filter, model in _UPLINK:
        if not mqtt.topic_matches_sub(topic_filter, topic):
            continue
        if not payload:
            _record(topic_filter in _CLEARABLE, f"{topic}: empty message on a topic that is not a retained state")
            return
        parsed = _validate(topic, payload, model)
        if isinstance(parsed, EventPayload) and topic.rsplit("/", 1)[-1] != parsed.kind:
            _record(False, f"{topic}: event of kind {parsed.kind!r} on another kind's topic")
        return


def check_reply(topic: str, payload: bytes) -> None:
    """A command reply on the response topic a request named."""
    _validate(topic, payload, CommandResponse)


def check_cart_request(topic: str, payload: bytes) -> None:
    _validate(topic, payload, CartRequest)


def take() -> tuple[int, list[str]]:
    """(messages checked so far, the problems found since the last take)."""
    with _lock:
        found = violations[:]
        violations.clear()
        return checked, found
