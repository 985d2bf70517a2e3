"""The MQTT contract with head office: every topic and payload shape, in one place.

docs/mqtt.md is the integrators' copy of this module; change both together. Topics are built from a prefix
(default ``storelink``) and the store id. Uplink events are QoS 1 and carry ``id`` (unique) and ``seq``
(per gateway, monotonic, gap-free across restarts) so head office can drop duplicates and see gaps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

KIND_RE = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
DEVICE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class Topics:
    """The typed topic map for one store (the zigbee2mqtt way: one place that knows every topic)."""

    store_id: str
    prefix: str = "storelink"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.store_id}"

    # uplink ----------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """Retained birth {"state": "online", ...}; the same topic is the Last Will {"state": "offline", ...}."""
        return f"{self.base}/status"

    def event(self, kind: str) -> str:
        return f"{self.base}/events/{kind}"

    def device_state(self, device_id: str) -> str:
        return f"{self.base}/devices/{device_id}/state"

    @property
    def prices_state(self) -> str:
        return f"{self.base}/prices/state"

    @property
    def config_reported(self) -> str:
        return f"{self.base}/config/reported"

    @property
    def outbox_state(self) -> str:
        """Retained: what waits in the store's outbox and how much it ever evicted (OutboxStatePayload)."""
        return f"{self.base}/outbox/state"

    # downlink --------------------------------------------------------------------------------------------
    @property
    def prices_batch(self) -> str:
        return f"{self.base}/prices/batch"

    def group_prices_batch(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/prices/batch"

    @property
    def prices_desired(self) -> str:
        return f"{self.base}/prices/desired"

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    @property
    def command_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def command_reply(self, name: str) -> str:
        """Replies to commands that named no response topic (MQTT 3.1.1 without reply_to)."""
        return f"{self.base}/cmd-reply/{name}"

    @property
    def cart_request(self) -> str:
        """Uplink, QoS 1, not retained: the kiosk asks head office for a signed-in customer's cart."""
        return f"{self.base}/cart/request"

    @property
    def cart_response(self) -> str:
        """Downlink: head office's answer, matched by correlation data (MQTT 5) or correlation_id (3.1.1)."""
        return f"{self.base}/cart/response"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestEvent(Strict):
    """What an in-store system posts to ``POST /api/v1/events``."""

    kind: str = Field(pattern=KIND_RE, max_length=64)
    device: str = Field(pattern=DEVICE_RE)
    data: dict[str, Any] = Field(default_factory=dict)


class EventPayload(Strict):
    """Published on ``{base}/events/{kind}``, QoS 1, not retained."""

    id: str
    seq: int
    ts: str = Field(description="acceptance time, ISO 8601 UTC")
    kind: str
    device: str
    data: dict[str, Any]


class StatusPayload(BaseModel):
    """Retained on ``{base}/status``."""

    model_config = ConfigDict(extra="allow")
    state: Literal["online", "offline"]
    store_id: str | None = None
    version: str | None = None
    started_at: str | None = None
    groups: list[str] | None = None  # the store's price groups (config `groups`), so head office knows its batches


class OutboxStatePayload(Strict):
    """Retained on ``{base}/outbox/state``, every ``OUTBOX_REPORT_EVERY`` seconds while connected."""

    depth: int
    bytes: int
    critical: int
    oldest_undelivered_at: str | None
    next_seq: int
    evicted_total: int = Field(description="telemetry evicted since the outbox was created (durable)")
    alarms: dict[str, str]
    ts: str


class EvictionReport(Strict):
    """``data`` of the ``outbox.evicted`` event: seq ranges evicted under the cap since the last report."""

    ranges: list[tuple[int, int]]
    count: int
    evicted_total: int = Field(description="evictions reported so far, this report included")


OUTBOX_REPORT_EVERY = 30.0


DeviceHealthState = Literal["ok", "degraded", "offline"]


class DeviceStatePayload(Strict):
    """Retained on ``{base}/devices/{device_id}/state``."""

    device: str
    driver: str
    state: DeviceHealthState
    last_error: str | None = None
    last_seen: str | None = None
    since: str


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT wildcard match (+ one level, # the rest)."""
    f_parts, t_parts = filter_.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


def is_valid_kind(kind: str) -> bool:
    return re.fullmatch(KIND_RE, kind) is not None
