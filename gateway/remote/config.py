"""Remote configuration, desired/reported like a device twin (docs/operations.md).

Head office publishes the whole config, signed, retained on ``{base}/config/desired``. The gateway verifies it
with ``[trust]`` keys, validates it with the same models as the local file, applies only what changed (drivers
whose table changed restart; the uplink reconnects when ``[mqtt]`` changed), saves it atomically as the
last-known-good config file and reports retained on ``{base}/config/reported``.

A config that changes ``[mqtt]`` is on trial: the file is written only once the new settings reach a broker.
If they don't within ``[remote] rollback_after`` seconds, everything goes back to the previous config and the
rollback is reported once that connection is back. A gateway killed during a trial restarts from the old file
and counts the trial as rolled back, so a bad config can never lock a store out for good.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from storelink.config import ConfigError, GatewayConfig, RunningConfig, parse_config
from storelink.devices.supervisor import DeviceSupervisor
from storelink.downlink import Downlink
from storelink.drivers.base import EventRef
from storelink.outbox import iso_ts
from storelink.parts import BasePart, Subscription
from storelink.remote.config_store import RemoteState, render_toml
from storelink.remote.models import ConfigDesired, ConfigReported, ConfigStatus
from storelink.remote.signing import SignatureError, canonical_json, load_public_key, verify
from storelink.system.files import write_atomically
from storelink.uplink import Uplink
from storelink.validation import describe_validation_error
from storelink.web.server import HttpServer

log = logging.getLogger(__name__)

# Sections applied by swapping the running config (they are read at each use) or by the code below.
SWAP_ONLY = {"trust", "config_version", "remote", "update"}
# Secrets head office may leave out of the desired config: the store keeps its own (see docs/operations.md).
LOCAL_SECRETS = (("mqtt", "password"), ("http", "token"))

EmitFn = Callable[[str, str, dict[str, Any]], Awaitable[EventRef]]
MAX_CONFIG_BYTES = 1024 * 1024  # a signed desired config; a store's config with 200 devices is ~50 KB
MAX_ERRORS = 20  # problems listed in one rejection report
# The handler waits for a config's [mqtt] trial (rollback_after, at most 3600 s): its time bound allows for that.
HANDLER_TIMEOUT = 3600.0 + 120.0


class Rejection(Exception):
    """``errors`` by key go to head office in the report; they may quote the rejected config, so they are bounded
    here and never logged."""

    def __init__(self, errors: dict[str, str], version: int | None = None):
        self.errors = {_bounded(k, 120): _bounded(v, 300) for k, v in list(errors.items())[:MAX_ERRORS]}
        if len(errors) > MAX_ERRORS:
            self.errors["config"] = f"{len(errors) - MAX_ERRORS} more problems not listed"
        self.version = version
        super().__init__(f"{len(errors)} problem(s)")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problems_by_key(err: ConfigError) -> dict[str, str]:
    out: dict[str, str] = {}
    for problem in err.problems:
        key, _, msg = problem.partition(": ")
        out[key if msg else "config"] = msg or problem
    return out


def changed_sections(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    a, b = old.model_dump(), new.model_dump()
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class RemoteConfig(BasePart):
    name = "config"

    def __init__(self, config: RunningConfig, uplink: Uplink, devices: DeviceSupervisor, http: HttpServer,
                 emit: EmitFn):
        self.config = config
        self.uplink = uplink
        self.devices = devices
        self.http = http
        self.emit = emit
        self.state = RemoteState(config.current.storage.path.parent / "remote-config.json")
        self.last_report: dict[str, Any] | None = None
        self.trial: dict[str, Any] | None = None  # {"version", "deadline"} while a new [mqtt] is on trial
        self._lock = asyncio.Lock()

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.uplink.topics.config_desired, self.on_desired, timeout=HANDLER_TIMEOUT)]

    # -- start-up ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Restores the last report; a trial interrupted by a restart counts as failed."""
        await asyncio.to_thread(self.state.load)
        trial = self.state.data.get("trial")
        running = self.config.current.config_version
        if isinstance(trial, dict) and isinstance(trial.get("version"), int):
            version = int(trial["version"])
            log.warning("config version %d was on trial when the gateway stopped: rolled back to %d", version,
                        running)
            self.state.add_rolled_back(version)
            self.state.data["trial"] = None
            self._report("rolled_back", version, {"mqtt": "the gateway restarted before the new [mqtt] settings "
                                                          "were confirmed; running the last-known-good config"})
            try:
                await asyncio.to_thread(self.state.save)
            except OSError as err:
                log.error("cannot save remote config state: %s", err)
        elif isinstance(self.state.data.get("last_report"), dict):
            try:
                report = ConfigReported.model_validate(self.state.data["last_report"])
            except ValidationError:
                log.warning("the saved remote config report does not match its model; not republished")
            else:
                self.last_report = report.model_dump()
                self.uplink.publish_state(self.uplink.topics.config_reported, report)

    # -- the downlink handler ----------------------------------------------------------------------------------
    async def on_desired(self, down: Downlink) -> None:
        if not down.payload:
            return  # head office cleared the retained desired config: nothing to do, the running one stays
        async with self._lock:
            try:
                await self._handle(down.payload)
            except Rejection as rej:
                self.http.rejections["config", next(iter(rej.errors), "config").split(".")[0][:32]] += 1
                log.warning("remote config %s rejected: %s (details in config/reported)",
                            f"version {rej.version}" if rej.version is not None else "message", rej)
                await self._settle("rejected", rej.version, rej.errors)

    async def _handle(self, raw: bytes) -> None:
        running = self.config.current
        try:
            payload = verify(raw, running.trust.public_keys, max_bytes=MAX_CONFIG_BYTES)
        except SignatureError as err:
            raise Rejection({"signature": err.reason}) from None
        try:
            desired = ConfigDesired.model_validate(payload)
        except ValidationError as err:
            raise Rejection({k: v for k, _, v in (p.partition(": ") for p in describe_validation_error(err))}
                            ) from None
        version = desired.version
        if desired.store_id != running.store_id:
            raise Rejection({"store_id": f"config is for store {desired.store_id!r}, this is "
                                         f"{running.store_id!r}"}, version)
        digest = hashlib.sha256(canonical_json(desired.config)).hexdigest()
        if version == running.config_version and digest == self.state.data.get("applied_hash"):
            return  # the retained copy of what already runs, redelivered on (re)connect
        if version in self.state.rolled_back:
            log.info("config version %d was rolled back before; ignoring it (publish a newer version)", version)
            return
        if version <= running.config_version:
            raise Rejection({"version": f"{version} is not newer than the running version "
                                        f"{running.config_version}"}, version)
        if self.config.path is None:
            raise Rejection({"config": "this gateway was started without a config file; nothing to update"},
                            version)
        data = self._merge_local_secrets(dict(desired.config), running)
        if data.setdefault("config_version", version) != version:
            raise Rejection({"config_version": f"must equal the envelope version {version} or be left out"},
                            version)
        try:
            new = parse_config(data, f"config/desired v{version}")
        except ConfigError as err:
            raise Rejection(problems_by_key(err), version) from None
        self._check_trust(new, version)
        try:
            toml_text = render_toml(data, new)
        except ConfigError as err:
            raise Rejection(problems_by_key(err), version) from None
        await self._apply(running, new, version, digest, toml_text)

    @staticmethod
    def _merge_local_secrets(data: dict[str, Any], running: GatewayConfig) -> dict[str, Any]:
        for section, key in LOCAL_SECRETS:
            local = getattr(getattr(running, section), key)
            table = data.get(section)
            if local is not None and isinstance(table, dict) and key not in table:
                data[section] = {**table, key: local}
        return data

    @staticmethod
    def _check_trust(new: GatewayConfig, version: int) -> None:
        if not new.trust.public_keys:
            raise Rejection({"trust.public_keys": "empty: head office could never configure this store again"},
                            version)
        for i, key in enumerate(new.trust.public_keys):
            try:
                load_public_key(key)
            except ValueError as err:
                raise Rejection({f"trust.public_keys[{i}]": str(err)}, version) from None

    # -- applying ----------------------------------------------------------------------------------------------
    async def _apply(self, old: GatewayConfig, new: GatewayConfig, version: int, digest: str, toml: str) -> None:
        path = self.config.path
        assert path is not None  # checked by _handle
        changed = changed_sections(old, new)
        if "mqtt" in changed and old.mqtt.topic_prefix != new.mqtt.topic_prefix:
            raise Rejection({"mqtt.topic_prefix": "cannot change remotely (every topic would move)"}, version)
        log.info("applying config version %d (changed: %s)", version, ", ".join(changed) or "nothing")
        if "mqtt" in changed:
            # On trial from before the uplink moves: the status shows it while the link is down, and a crash
            # from here on restarts from the old file and counts the version as rolled back.
            self.state.data["trial"] = {"version": version, "from": old.config_version}
            await asyncio.to_thread(self.state.save)
            self.trial = {"version": version, "deadline": iso_ts(time.time() + new.remote.rollback_after)}
        try:
            restart_required = await self._apply_live(old, new, changed)
        except BaseException:
            self.trial = None
            raise
        if "mqtt" in changed:
            if not await self._trial(new, version):
                await self._apply_live(new, old, changed)
                self.state.data["trial"] = None
                self.state.add_rolled_back(version)
                err = self.uplink.last_error or "no connection"
                await self._settle("rolled_back", version, {
                    "mqtt": f"no broker connection within {new.remote.rollback_after:g}s ({err}); "
                            f"rolled back to version {old.config_version}"})
                return
        try:
            await asyncio.to_thread(write_atomically, path, toml.encode(), 0o640)
        except OSError as err:
            log.error("cannot save config version %d: %s; reverting", version, err)
            await self._apply_live(new, old, changed)
            self.state.data["trial"] = None
            raise Rejection({"file": f"cannot write {path}: {err.strerror or err}"}, version) from None
        self.state.data["trial"] = None
        self.state.data["applied_hash"] = digest
        await self._settle("accepted" if restart_required else "applied", version, {}, changed, restart_required)

    async def _apply_live(self, old: GatewayConfig, new: GatewayConfig, changed: list[str]) -> list[str]:
        """Bring the running gateway from `old` to `new`; returns the sections that need a restart."""
        self.config.current = new
        restart: list[str] = []
        for section in changed:
            if section in SWAP_ONLY:
                continue
            if section == "mqtt":
                await self.uplink.reconfigure(new.mqtt)
            elif section == "devices":
                result = await self.devices.replace(new.device_configs)
                log.info("devices: %s", {k: v for k, v in result.items() if v})
                if self.devices.services.kiosk is None and any(
                        h.driver_class.uses_kiosk_sessions for h in self.devices.devices.values()):
                    restart.append("devices")  # the kiosk sessions a new kiosk device needs start at the next start
            elif section == "logging":
                logging.getLogger().setLevel(new.logging.level)
                if new.logging.journal != old.logging.journal:
                    restart.append("logging.journal")
            elif section == "http":
                if new.http.model_copy(update={"token": None}) != old.http.model_copy(update={"token": None}):
                    await self.http.stop()
                    await self.http.start()
            else:
                restart.append(section)  # storage, groups, and parts that apply their section at start-up
        return restart

    async def _trial(self, new: GatewayConfig, version: int) -> bool:
        """Wait for the new [mqtt] settings to reach a broker."""
        uplink = self.uplink
        deadline = time.monotonic() + new.remote.rollback_after
        try:
            while time.monotonic() < deadline:
                if uplink.connected:
                    return True
                await asyncio.sleep(0.1)
            log.error("config version %d: no broker connection within %gs; rolling back", version,
                      new.remote.rollback_after)
            return False
        finally:
            self.trial = None

    # -- reporting ---------------------------------------------------------------------------------------------
    def _report(self, status: ConfigStatus, version: int | None, errors: dict[str, str],
                changed: list[str] | None = None, restart_required: list[str] | None = None) -> dict[str, Any]:
        report = ConfigReported(
            status=status, version=version, running_version=self.config.current.config_version, errors=errors,
            changed=changed or [], restart_required=restart_required or [], ts=iso_ts(time.time()),
        )
        self.last_report = self.state.data["last_report"] = report.model_dump()
        # Retained, and republished by the uplink on every reconnect: a rollback is reported once connected.
        self.uplink.publish_state(self.uplink.topics.config_reported, report)
        return self.last_report

    async def _settle(self, status: ConfigStatus, version: int | None, errors: dict[str, str],
                      changed: list[str] | None = None, restart_required: list[str] | None = None) -> None:
        report = self._report(status, version, errors, changed, restart_required)
        try:
            await asyncio.to_thread(self.state.save)
        except OSError as err:
            log.error("cannot save remote config state: %s", err)
        try:
            await self.emit(f"config.{status}", "gateway", report)
        except Exception as err:  # the retained report is the record that matters; the event is an audit copy
            log.error("cannot record config.%s event: %s", status, err)

    def status(self) -> dict[str, Any]:
        return {
            "version": self.config.current.config_version,
            "last_result": self.last_report,
            "trial": self.trial,
        }

