"""Config sections and payloads of remote config, commands and the kiosk cart (imported by storelink.config and
storelink.contract, so it imports nothing of StoreLink but the validation base)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from storelink.validation import Identifier, StrictModel


class RemoteConfigSettings(StrictModel):
    """``[remote]``: how remote config and commands behave."""

    rollback_after: float = Field(
        60.0, ge=1, le=3600, description="seconds a config with new [mqtt] settings has to reach the broker"
    )
    command_max_age: float = Field(
        300.0, ge=5, le=86400, description="signed commands issued longer ago than this are refused (replay)"
    )


class CartSettings(StrictModel):
    """``[cart]``: the kiosk's online cart (gateway/kiosk/cart.py)."""

    enabled: bool = True
    printer: Identifier | None = Field(None, description="device id of the kiosk's receipt printer")
    timeout: float = Field(8.0, gt=0, le=60, description="seconds to wait for head office's answer")


# -- payloads ----------------------------------------------------------------------------------------------------
class ConfigDesired(StrictModel):
    """The signed payload on ``{base}/config/desired`` (inside the signing envelope)."""

    kind: Literal["storelink.config"]
    store_id: str
    version: int = Field(ge=1)
    config: dict[str, Any]


ConfigStatus = Literal["applied", "accepted", "rejected", "rolled_back"]


class ConfigReported(StrictModel):
    """Retained on ``{base}/config/reported``.

    ``applied``: running and saved. ``accepted``: saved, some sections (``restart_required``) take effect at the
    next start. ``rejected``: not used, ``errors`` by key. ``rolled_back``: the new [mqtt] did not reach the
    broker within [remote] rollback_after; the previous config runs again.
    """

    status: ConfigStatus
    version: int | None = Field(description="the version this report is about (None: could not be read)")
    running_version: int
    errors: dict[str, str] = Field(default_factory=dict)
    changed: list[str] = Field(default_factory=list)
    restart_required: list[str] = Field(default_factory=list)
    ts: str


class SignedCommand(StrictModel):
    """The signed payload of a command that changes something."""

    kind: Literal["storelink.command"]
    store_id: str
    command: str
    id: str = Field(min_length=8, max_length=64, description="unique per command; replays are refused")
    issued_at: float = Field(description="Unix time; older than [remote] command_max_age is refused")
    args: dict[str, Any] = Field(default_factory=dict)
    reply_to: str | None = Field(None, min_length=1, max_length=256)
    correlation_id: str | None = Field(None, max_length=200)


class CommandRequest(StrictModel):
    """An unsigned command (read-only ones: ping, status); reply_to/correlation_id are the MQTT 3.1.1 fallback."""

    args: dict[str, Any] = Field(default_factory=dict)
    reply_to: str | None = Field(None, min_length=1, max_length=256)
    correlation_id: str | None = Field(None, max_length=200)


class CommandResponse(StrictModel):
    ok: bool
    command: str
    result: Any = None
    error: str | None = None
    code: Literal["bad_request", "unknown_command", "bad_args", "unauthorized", "unavailable", "failed"] | None = None
    correlation_id: str | None = None
    ts: str
