"""The MQTT contract with head office: every topic and payload shape, in one place.

docs/mqtt.md is the integrators' copy of this module; change both together (its JSON Schemas are generated from
the models below by ``python -m storelink.contract``, and tests/test_contract.py fails when they drift). Topics
are built from a prefix (default ``storelink``) and the store id. Uplink events are QoS 1 and carry ``id``
(unique) and ``seq`` (per gateway, monotonic, gap-free across restarts) so head office can drop duplicates and
see gaps. Everything the gateway publishes is built from these models; the test suite validates every message a
test subscriber receives against them (tests/contract_check.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from json.encoder import encode_basestring as _str
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from storelink import safe_json
from storelink.remote.models import (
    CommandRequest,
    CommandResponse,
    ConfigDesired,
    ConfigReported,
    SignedCommand,
)
from storelink.update.models import UpdateState
from storelink.validation import Identifier, StrictModel

KIND_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"


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
        """Retained birth {"state": "online", ...}; the same topic is the Last Will {"state": "offline"}."""
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

    @property
    def update_state(self) -> str:
        """Retained: the release this store runs and where its last software update stands (UpdateState)."""
        return f"{self.base}/update/state"

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


# -- uplink payloads --------------------------------------------------------------------------------------------
class StatusPayload(StrictModel):
    """Retained on ``{base}/status``: the birth message (every field) and the Last Will (``state`` only)."""

    state: Literal["online", "offline"]
    store_id: str | None = None
    version: str | None = None
    started_at: str | None = Field(default=None, description="when the gateway started, ISO 8601 UTC")
    protocol: Literal["5", "3.1.1"] | None = None
    groups: list[Identifier] | None = Field(default=None, description="the store's price groups (config `groups`), "
                                            "in the birth and the Last Will: head office matches group batches by it")

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


OUTBOX_REPORT_EVERY = 30.0  # seconds between two retained outbox/state reports while connected


class OutboxStatePayload(StrictModel):
    """Retained on ``{base}/outbox/state``, every ``OUTBOX_REPORT_EVERY`` seconds while connected."""

    depth: int = Field(ge=0, description="events waiting to be delivered")
    bytes: int = Field(ge=0)
    critical: int = Field(ge=0, description="of them, never evictable (sales, price and config events)")
    oldest_undelivered_at: str | None = Field(description="acceptance time of the oldest waiting event")
    next_seq: int = Field(ge=1, description="the seq the next event gets")
    evicted_total: int = Field(ge=0, description="telemetry evicted since the outbox was created (durable)")
    alarms: dict[str, str] = Field(description="outbox alarms raised now: capacity, storage")
    ts: str = Field(description="when this report was made")


class EvictionReport(StrictModel):
    """``data`` of an ``outbox.evicted`` event: seq ranges evicted under the cap since the previous report."""

    ranges: list[tuple[int, int]] = Field(description="inclusive [first, last] seq ranges, at most 1,000")
    count: int = Field(ge=1, description="seqs in the ranges")
    evicted_total: int = Field(ge=1, description="evictions reported so far, this report included")


class EventPayload(StrictModel):
    """Published on ``{base}/events/{kind}``, QoS 1, not retained."""

    id: str = Field(description="unique per event; a re-sent event has the same id")
    seq: int = Field(ge=1, description="per gateway, monotonic and gap-free across restarts")
    ts: str = Field(description="acceptance time, ISO 8601 UTC")
    kind: str = Field(pattern=KIND_PATTERN, max_length=64)
    device: Identifier
    data: dict[str, Any]

    @staticmethod
    def encode(event_id: str, seq: int, ts: str, kind: str, device: str, data_json: str) -> bytes:
        """The wire form of one event from its already-encoded ``data`` (the outbox encodes data once, when it
        accepts the event, and takes seq when it commits). The fields are this model's, in its order (checked
        below); building a model instance per event would cost the outbox a quarter of its throughput."""
        return (f'{{"id":{_str(event_id)},"seq":{seq:d},"ts":{_str(ts)},"kind":{_str(kind)},'
                f'"device":{_str(device)},"data":{data_json}}}').encode()


assert tuple(EventPayload.model_fields) == ("id", "seq", "ts", "kind", "device", "data")


class DeviceStatePayload(StrictModel):
    """Retained on ``{base}/devices/{device_id}/state``; an empty retained message clears a removed device."""

    device: Identifier
    driver: str
    state: Literal["ok", "degraded", "offline"]
    last_error: str | None = None
    last_seen: str | None = None
    since: str


class PendingBatch(StrictModel):
    batch_id: str
    version: int | None
    phase: str
    effective_at: str | None
    chunks_done: int | None
    chunks_total: int | None
    items: int | None
    changed: int | None
    received_at: str | None
    running: bool = Field(description="the coordinator is driving this batch now")


class TransitionItem(StrictModel):
    sku: str
    description: str | None
    old_price: int | None = Field(description="minor units; null for an item the change adds")
    new_price: int | None = Field(description="minor units; null for an item the change removes")
    kind: Literal["add", "change", "remove"]
    charged: int | None = Field(description="what every till answers meanwhile: the lower of old and new")


class LabelDeviceProgress(StrictModel):
    confirmed: bool = Field(description="this label device shows the version (or, after an abort, the old content)")
    left: int | None = Field(None, description="its labels that do not show the version yet (devices that count)")
    total: int | None = Field(None, description="its labels the version changes")


class TransitionState(StrictModel):
    batch_id: str
    version: int | None
    outcome: str
    since: str | None
    skus: int = Field(description="SKUs whose lookups answer min(old, new) until the labels confirm")
    items: list[TransitionItem] = Field(description="the first 20 of those SKUs, by SKU")
    labels: dict[str, LabelDeviceProgress] = Field(description="each label device, once it is being waited for")
    labels_left: int | None = Field(description="labels left on the devices that count them")


class LastBatch(StrictModel):
    batch_id: str
    version: int | None
    outcome: str
    reason: str | None
    at: str | None


class LabelBatchShows(StrictModel):
    """What a label device is known to display for one open batch (per item: new, old, either)."""

    batch_id: str
    version: int
    outcome: Literal["committed", "aborted"]
    shows: dict[Literal["new", "old", "unknown"], int] | None = Field(
        description="items by what their label is known to show (from the last item-by-item look)")
    past_deadline: bool


class LabelUndelivered(StrictModel):
    batch_id: str
    version: int
    action: Literal["commit", "abort"]


class LabelShowsState(StrictModel):
    batches: list[LabelBatchShows] = []
    undelivered: list[LabelUndelivered] = []


class PriceDeviceState(StrictModel):
    role: Literal["till", "label"]
    version: int | None
    state: Literal["current", "stale", "pending", "unknown", "holding", "held_back", "confirming", "restoring",
                   "undelivered", "drift"]
    batch_state: str | None
    drift: str | None
    shows: LabelShowsState | None = Field(None, description="labels only: what it is known to display")


class ScheduledBatch(StrictModel):
    batch_id: str
    version: int
    effective_at: str | None
    decided_at: str | None


class ClockReport(StrictModel):
    synchronised: bool | None = Field(description="None: the kernel could not tell")
    source: Literal["adjtimex", "config"]
    detail: str
    checked_at: float


class PricesStatePayload(StrictModel):
    """Retained on ``{base}/prices/state`` (also the "prices" section of ``GET /api/v1/status``)."""

    store_id: str
    active_version: int
    active_batch: str | None
    currency: str | None
    active_since: str | None
    items: int
    pending: PendingBatch | None
    scheduled: list[ScheduledBatch] = Field(description="decided, waiting for their effective_at, in order")
    transition: list[TransitionState]
    last: LastBatch | None
    devices: dict[str, PriceDeviceState]
    drift: int
    clock: ClockReport
    updated_at: str


class CartRequest(StrictModel):
    """Published on ``{base}/cart/request`` (QoS 1, not retained, never stored): a kiosk asks for a cart."""

    kiosk: Identifier
    session: str
    customer: str = Field(description="opaque sign-in token; head office resolves it")
    list: Literal["cart", "wishlist"]
    correlation_id: str
    reply_to: str
    ts: str


# -- downlink payloads ------------------------------------------------------------------------------------------
class CartItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # what we don't know we don't keep
    sku: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=120)
    qty: int = Field(1, ge=1, le=999)
    price: int | None = Field(None, ge=0, description="minor units")


class CartAnswer(BaseModel):
    """Head office's answer on ``{base}/cart/response`` (unknown fields are dropped, not kept)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    correlation_id: str | None = None
    ok: bool
    error: str | None = Field(None, max_length=200)
    items: list[CartItem] = Field(default_factory=list, max_length=500)
    currency: str | None = Field(None, max_length=8)


# -- HTTP --------------------------------------------------------------------------------------------------------
class IngestEvent(StrictModel):
    """What an in-store system posts to ``POST /api/v1/events``."""

    kind: str = Field(pattern=KIND_PATTERN, max_length=64)
    device: Identifier
    data: dict[str, Any] = Field(default_factory=dict)


def uplink_payloads(topics: Topics, kind: str = "+", device: str = "+", name: str = "+"
                    ) -> list[tuple[str, type[BaseModel]]]:
    """(topic filter, model) for every message the gateway publishes. Command replies also go to the response
    topic a request named; they are CommandResponse there too."""
    return [
        (topics.status, StatusPayload),
        (topics.event(kind), EventPayload),
        (topics.device_state(device), DeviceStatePayload),
        (topics.prices_state, PricesStatePayload),
        (topics.outbox_state, OutboxStatePayload),
        (topics.config_reported, ConfigReported),
        (topics.update_state, UpdateState),
        (topics.command_reply(name), CommandResponse),
        (topics.cart_request, CartRequest),
    ]


def downlink_payloads(topics: Topics, name: str = "+") -> list[tuple[str, type[BaseModel]]]:
    """(topic, model) of what head office sends, other than price batches (gateway/prices/models.py). Signed
    messages travel in storelink.remote.signing's envelope; the model is the envelope's payload."""
    return [
        (topics.config_desired, ConfigDesired),
        (topics.command(name), CommandRequest),
        (topics.command(name), SignedCommand),
        (topics.cart_response, CartAnswer),
    ]


def json_schemas() -> list[tuple[str, type[BaseModel], dict[str, Any]]]:
    """(topic, model, JSON Schema) of every payload, in the order docs/mqtt.md lists them."""
    topics = Topics("{store_id}", "{prefix}")
    rows: list[tuple[str, type[BaseModel]]] = [*uplink_payloads(topics, "{kind}", "{device_id}", "{name}"),
                                               *downlink_payloads(topics, "{name}"),
                                               ("POST /api/v1/events", IngestEvent)]
    return [(topic, model, model.model_json_schema()) for topic, model in rows]


def _untitled(value: Any) -> Any:
    """A schema without pydantic's generated titles ("Store Id" for store_id): noise for a reader."""
    if isinstance(value, dict):
        return {k: _untitled(v) for k, v in value.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(value, list):
        return [_untitled(v) for v in value]
    return value


def _dump(value: Any, indent: int = 0, width: int = 116) -> str:
    """JSON with every object or list that fits in one line written on one line."""
    flat = json.dumps(value, ensure_ascii=False)
    if indent + len(flat) <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        inner = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(inner) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + _dump(v, indent + 2, width) for v in value) + "\n" + " " * indent + "]"


def render_schemas() -> str:
    """The generated section of docs/mqtt.md."""
    out = []
    for topic, model, schema in json_schemas():
        out += [f"### `{topic}`: {model.__name__}", "", "```json", _dump(_untitled(schema)), "```", ""]
    return "\n".join(out)


def is_publish_topic(topic: object) -> TypeGuard[str]:
    """A topic the gateway may publish to: MQTT's rules for a topic name (1..65535 UTF-8 bytes, no wildcards, no
    U+0000; a broker disconnects a client that breaks them), bounded to 256 characters. A reply topic named by a
    message is checked with this before anything is sent there."""
    return (isinstance(topic, str) and 0 < len(topic) <= 256 and not any(c in topic for c in "+#\x00")
            and safe_json.text_ok(topic))
