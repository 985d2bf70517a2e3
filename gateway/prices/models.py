"""The price part's contract: the `[prices]` config section and every payload on the price topics.

docs/prices.md is the integrators' copy of this module. A batch travels as one signed *manifest* plus N *chunks*
on ``storelink/{store}/prices/batch`` (or ``storelink/groups/{group}/prices/batch``); the manifest lists the
SHA-256 of every chunk's bytes, so one Ed25519 signature covers the whole batch and each chunk is checked the
moment it arrives.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storelink.validation import Sku, StrictModel

FORMAT = 1
BATCH_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_CHUNKS = 10_000
MAX_CHUNK_BYTES = 8 * 1024 * 1024  # decoded and decompressed, per chunk
MAX_CHUNK_DATA = MAX_CHUNK_BYTES * 4 // 3 + 4  # a chunk's base64 text
MAX_MESSAGE_BYTES = MAX_CHUNK_DATA + 64 * 1024  # one batch message (a chunk with its envelope, or a manifest)


class PricesConfig(StrictModel):
    """The `[prices]` section."""

    path: Path | None = Field(None, description="price book database; default: prices.db beside storage.path")
    prepare_deadline: float = Field(60.0, gt=0, description="seconds every target has to prepare before ABORT")
    prepare_items_in_flight: int = Field(200_000, ge=1, description="bounds memory: targets prepare in parallel "
                                         "only while their changes together hold at most this many items")
    commit_retry: float = Field(2.0, gt=0, description="seconds between re-sending COMMIT/ABORT to a target")
    confirm_poll: float = Field(2.0, gt=0, description="seconds between checks that labels show the new prices")
    label_deadline: float = Field(1800.0, gt=0, description="seconds after a commit until labels that have not "
                                  "confirmed are reported as drift and the change completes without them")
    abort_hold: float = Field(600.0, gt=0, description="the same deadline for labels putting their old content "
                              "back after an abort")
    clock_synchronised: Literal["auto"] | bool = Field(
        "auto", description="whether the store's clock is synchronised (NTP); auto asks the kernel (adjtimex). "
        "Scheduled changes (effective_at) are refused while it is not")
    stale_check: float = Field(5.0, gt=0, description="seconds between checks that every till is on the book's version")
    audit_interval: float = Field(300.0, ge=1, description="seconds between reconciliation audits")
    staging_ttl: float = Field(3600.0, gt=0, description="seconds an incomplete batch is kept before it is dropped")
    resend_every: float = Field(300.0, ge=1, description="seconds between resend requests while behind desired")
    resend_grace: float = Field(10.0, ge=0, description="seconds a newer prices/desired waits for its batch to "
                                "arrive before a resend is asked (the two travel on different topics)")
    max_items: int = Field(500_000, ge=1, description="largest batch accepted")
    max_staged_batches: int = Field(4, ge=1, description="incomplete batches held at once (older ones dropped)")
    max_parked_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024, description="bytes of chunks that arrived "
                                  "before their manifest (unsigned until it comes) kept at once; oldest dropped")


class Reason(enum.StrEnum):
    """Why a batch was rejected (the `reason` of a `price.rejected` event)."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    STALE = "stale"
    REPLAYED = "replayed"
    WRONG_TARGET = "wrong_target"
    TOO_LARGE = "too_large"
    CLOCK = "clock_not_synchronised"  # a scheduled batch on a store whose clock is not synchronised


class Promotion(StrictModel):
    """Display metadata for labels. The till charges `price`; a promotion's end is a new batch from head office,
    because the gateway never changes a price on its own clock (labels could not follow atomically)."""

    label: str = Field("", max_length=64)
    ends_at: datetime | None = None
    regular_price: int | None = Field(None, ge=0, description="the struck-through price, minor units")


class ItemIn(StrictModel):
    sku: Sku
    gtin: str | None = Field(None, pattern=r"^[0-9]{8,14}$")
    price: int = Field(ge=0, le=10**9, description="minor units (cents)")
    unit_price: int | None = Field(None, ge=0, le=10**9)
    unit_basis: str | None = Field(None, max_length=16)
    description: str = Field("", max_length=200)
    promotion: Promotion | None = None


class Target(StrictModel):
    store: str | None = None
    group: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.store is None) == (self.group is None):
            raise ValueError("target names exactly one of store or group")
        return self


class ChunkRef(StrictModel):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    items: int = Field(ge=0)


class Manifest(StrictModel):
    """The signed payload of a batch (canonical JSON, storelink.remote.signing). Lists every chunk's SHA-256."""

    kind: Literal["prices.manifest"] = Field(description="what the signature is for (never valid as a config)")
    format: Literal[1] = 1
    batch_id: str = Field(pattern=BATCH_ID_RE)
    version: int = Field(ge=1)
    target: Target
    mode: Literal["full", "delta"] = "full"
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    effective_at: datetime | None = None
    created_at: datetime
    not_after: datetime | None = Field(None, description="reject the batch if it arrives after this instant")
    item_count: int = Field(ge=0)
    encoding: Literal["zlib", "identity"] = "zlib"
    chunks: list[ChunkRef] = Field(min_length=1, max_length=MAX_CHUNKS)

    @model_validator(mode="after")
    def _counts_add_up(self) -> Manifest:
        if sum(c.items for c in self.chunks) != self.item_count:
            raise ValueError("item_count is not the sum of the chunks' item counts")
        return self

    @field_validator("effective_at", "created_at", "not_after")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("timestamps must carry a timezone (use ...Z)")
        return v


class ManifestMessage(StrictModel):
    """``{"type": "manifest", "envelope": {"payload": <Manifest>, "key_id": ..., "sig": ...}}``: the envelope is
    storelink.remote.signing's (sig over the canonical JSON of payload); the payload is validated after the
    signature."""

    type: Literal["manifest"]
    envelope: dict[str, Any]


class ChunkMessage(StrictModel):
    type: Literal["chunk"]
    batch_id: str = Field(pattern=BATCH_ID_RE)
    index: int = Field(ge=0, lt=MAX_CHUNKS)
    data: str = Field(max_length=MAX_CHUNK_DATA,
                      description="base64 of the chunk bytes (zlib-compressed JSON array of items, or plain)")


class Desired(BaseModel):
    """Retained on ``{base}/prices/desired`` by head office: the version this store should run."""

    model_config = ConfigDict(extra="allow")
    version: int = Field(ge=0)
    batch_id: str | None = None


# -- what the coordinator hands to targets (satisfies drivers.base.PriceChange / PriceItem) -------------------
@dataclass(frozen=True, slots=True)
class BookItem:
    sku: str
    gtin: str | None
    price: int
    unit_price: int | None
    unit_basis: str | None
    description: str
    promotion: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Change:
    version: int
    batch_id: str
    currency: str
    changed: list[BookItem]
    removed: list[str] = field(default_factory=list)
    full: bool = False  # True: `changed` is the whole price book (a stale device catching up)
    transition_prices: dict[str, int] = field(default_factory=dict)  # sku -> min(old, new), for tills
    effective_at: float | None = None  # unix time; None: at once


BURNED = ("staged", "preparing", "commit_decided", "committed", "done", "aborting", "aborted")
"""Phases after which a batch's version is used up: a later batch must carry a higher version."""
IN_PROGRESS = ("staging", "staged", "preparing", "commit_decided", "committed", "aborting")
FINISHED = ("done", "aborted")
