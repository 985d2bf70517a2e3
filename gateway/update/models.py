"""The ``[update]`` config section and the payloads of software updates (imported by storelink.config).

It imports nothing of StoreLink but the validation base, so that storelink.config can import it without a cycle.
"""

from __future__ import annotations

import re
from datetime import datetime, time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ConfigDict, Field, field_validator

from storelink.validation import StrictModel

VERSION_RE = r"^[0-9]+(\.[0-9]+){0,3}([a-z]+[0-9]*)?(\.(dev|post)[0-9]+)?(\+[A-Za-z0-9.]+)?$"
SHA256_RE = r"^[0-9a-f]{64}$"
_WINDOW_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])$")


def parse_window(text: str) -> tuple[time, time]:
    m = _WINDOW_RE.match(text)
    if not m:
        raise ValueError(f"a window is HH:MM-HH:MM in the store's local time, got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    end = time(23, 59, 59) if h2 == 24 else time(h2, m2)
    return time(h1, m1), end


class UpdateSettings(StrictModel):
    """``[update]``: how this store takes software updates (docs/config.md)."""

    enabled: bool = Field(True, description="false: update commands are refused")
    windows: list[str] = Field(default_factory=list, description='install only within these, e.g. ["02:00-05:00"]')
    timezone: str = Field("Etc/UTC", description="the store's time zone for windows (IANA name)")
    health_deadline: float = Field(120.0, ge=5, le=3600, description="seconds a new release has to become healthy")
    healthy_for: float = Field(5.0, ge=0, le=600, description="seconds it must stay healthy before it is kept")
    crash_loop_restarts: int = Field(3, ge=1, le=100, description="restarts during the trial that mean a crash loop")
    ca: Path | None = Field(None, description="CA bundle for the release server (default: the system's)")
    keep_releases: int = Field(3, ge=2, le=20, description="installed releases kept for rollbacks")

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        for w in v:
            parse_window(w)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    def in_window(self, now: datetime) -> bool:
        """True when an install may start at `now` (an aware datetime)."""
        if not self.windows:
            return True
        local = now.astimezone(ZoneInfo(self.timezone)).time()
        for w in self.windows:
            start, end = parse_window(w)
            inside = start <= local <= end if start <= end else (local >= start or local <= end)  # over midnight
            if inside:
                return True
        return False


# -- the signed command head office sends (args of `storelink.command` "update") -----------------------------
class ReleaseRef(StrictModel):
    version: str = Field(pattern=VERSION_RE)
    url: str = Field(pattern=r"^https://", description="where the bundle is served; only HTTPS")
    sha256: str = Field(pattern=SHA256_RE, description="of the whole bundle file")
    size: int = Field(gt=0, le=2 * 1024**3)


class UpdateArgs(StrictModel):
    action: Literal["install", "rollback"] = "install"
    release: ReleaseRef | None = None  # install: what to fetch
    version: str | None = Field(None, pattern=VERSION_RE)  # rollback: an installed release to go back to
    rollout: str | None = Field(None, max_length=64)
    allow_irreversible: bool = Field(False, description="install even when a rollback past it is impossible")
    ignore_window: bool = Field(False, description="install now, outside the maintenance windows")


UpdatePhase = Literal["idle", "downloading", "downloaded", "waiting_window", "installing", "trial", "healthy",
                      "rolled_back", "failed"]


class UpdateState(StrictModel):
    """Retained on ``{base}/update/state``: what this store runs and where its last update stands."""

    version: str  # the release running now
    state: UpdatePhase
    target: str | None = None
    rollout: str | None = None
    reason: str | None = None
    progress: float | None = None  # downloading: 0..1
    groups: list[str] = Field(default_factory=list)  # the store's groups: head office targets --group by them
    ts: str


# -- files between the gateway's agent and the root-side updater (<state dir>/update/) -----------------------
class PendingUpdate(StrictModel):
    """pending.json: the agent asks the updater to act (the updater verifies everything again)."""

    action: Literal["install", "rollback"]
    version: str = Field(pattern=VERSION_RE)
    bundle: Path | None = None
    sha256: str | None = None
    rollout: str | None = None
    allow_irreversible: bool = False
    requested_at: float


class Trial(StrictModel):
    """trial.json: written by the updater before it switches; a restarted updater resumes from it."""

    model_config = ConfigDict(frozen=False)  # a record the updater updates in place
    version: str
    previous: str
    rollout: str | None = None
    action: Literal["install", "rollback"] = "install"
    reversible: bool = True
    started_at: float
    deadline: float
    restarts_at_switch: int = 0
    baseline: dict[str, Any] = Field(default_factory=dict)  # what was ok before: {"connected", "devices_ok"}


class UpdateResult(StrictModel):
    """result.json: the updater's verdict, reported to head office by whichever release runs next."""

    model_config = ConfigDict(frozen=False)  # a record the updater updates in place
    version: str
    previous: str | None
    running: str
    outcome: Literal["healthy", "rolled_back", "failed"]
    reason: str | None = None
    rollout: str | None = None
    ts: float
