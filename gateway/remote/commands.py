"""Commands from head office on ``{base}/cmd/{name}``, and the same actions from the local status page.

MQTT 5: the reply goes to the request's response topic with its correlation data. MQTT 3.1.1 has neither, so a
request may carry ``reply_to`` and ``correlation_id`` in its JSON; without any reply target the reply goes to
``{base}/cmd-reply/{name}`` so that no error is ever silent. Read-only commands (``ping``, ``status``) may be
sent unsigned; commands that change something must be a signed envelope (storelink.remote.signing) whose payload names
this store and this command, carries a unique id and is recent (``[remote] command_max_age``): a recorded
command cannot be replayed, not even after a restart (storelink.remote.replay keeps the used ids on disk). The
status page calls ``Commands.execute`` directly behind the ``http.token``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError, model_validator

from storelink import __version__, safe_json
from storelink.config import RunningConfig
from storelink.contract import is_publish_topic
from storelink.devices.supervisor import DeviceSupervisor
from storelink.downlink import Downlink
from storelink.outbox import iso_ts
from storelink.parts import BasePart, Subscription
from storelink.prices.part import PricesPart
from storelink.remote.models import CommandRequest, CommandResponse, SignedCommand
from storelink.remote.replay import Replayed, ReplayGuard
from storelink.remote.signing import SignatureError, verify
from storelink.system.logs import exception_summary, loggable_id
from storelink.uplink import Uplink
from storelink.validation import Identifier, Sku, StrictModel, describe_validation_error

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 256 * 1024  # a command with 10,000 SKUs to reprint is ~200 KB
COMMAND_TIMEOUT = 300.0  # a reprint of every label may take minutes; past this the command answers `failed`
MAX_NAME = 64  # a command name longer than any known one is unknown; this bounds what the reply echoes


class CommandError(Exception):
    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


class _Args(StrictModel):
    """A command's arguments."""


class NoArgs(_Args):
    pass


class ReprintArgs(_Args):
    skus: list[Sku] | None = Field(None, min_length=1, max_length=10_000)
    all: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> ReprintArgs:
        if (self.skus is None) == (not self.all):
            raise ValueError("give either skus (a list) or all=true")
        return self


class RestartArgs(_Args):
    device: Identifier


@dataclass(frozen=True)
class Command:
    args: type[StrictModel]  # the arguments model; unknown keys are refused
    changes_something: bool
    run: Callable[[Any], Awaitable[Any]]
    help: str


@dataclass(frozen=True)
class _ReprintChange:
    """A PriceChange (drivers.base): the labels in force of some items, for LabelPriceTarget.price_reprint."""

    version: int
    batch_id: str
    currency: str
    changed: list[Any]
    transition_prices: dict[str, int]
    effective_at: float | None = None


class Commands(BasePart):
    name = "commands"

    def __init__(self, config: RunningConfig, uplink: Uplink, devices: DeviceSupervisor, prices: PricesPart | None,
                 status: Callable[[], dict[str, Any]], more: Mapping[str, Command] | None = None,
                 rejections: collections.Counter[tuple[str, str]] | None = None):
        """``more``: commands other parts run (the update agent's ``update``), by name. ``rejections``: the
        gateway's counters of refused input (status, /metrics)."""
        self.rejections = rejections if rejections is not None else collections.Counter()
        self.config = config
        self.uplink = uplink
        self.topics = uplink.topics
        self.devices = devices
        self.prices = prices
        self.gateway_status = status
        self.replay = ReplayGuard(config.current.storage.path.parent / "replay-guard.json")
        self.counts: dict[tuple[str, str], int] = {}  # (command, outcome) -> n, for /metrics
        self.table: dict[str, Command] = {
            "ping": Command(NoArgs, False, self._ping, "answers pong"),
            "status": Command(NoArgs, False, self._status, "the status API document"),
            "reprint-labels": Command(ReprintArgs, True, self._reprint, "print/push labels again: skus or all"),
            "resync-prices": Command(NoArgs, True, self._resync, "re-check devices and ask for a resend if behind"),
            "restart-device": Command(RestartArgs, True, self._restart, "restart one device's driver"),
            **(more or {}),
        }

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.topics.command_filter, self.on_command, timeout=COMMAND_TIMEOUT + 30)]

    async def start(self) -> None:
        await asyncio.to_thread(self.replay.load)  # commands wait for the part to run, so for the record

    # -- shared by MQTT and HTTP -------------------------------------------------------------------------------
    async def execute(self, name: str, raw_args: Any) -> Any:
        cmd = self.table.get(name)
        if cmd is None:
            raise CommandError("unknown_command",
                               f"unknown command {safe_json.echo(name)} (known: {', '.join(self.table)})")
        if not isinstance(raw_args, dict):
            raise CommandError("bad_args", "args must be a JSON object")
        try:
            args = cmd.args.model_validate(raw_args)
        except ValidationError as err:
            raise CommandError("bad_args", "; ".join(describe_validation_error(err)[:10])) from None
        return await cmd.run(args)

    def _count(self, name: str, outcome: str) -> None:
        key = (name if name in self.table else "(unknown)", outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    # -- the MQTT handler --------------------------------------------------------------------------------------
    async def on_command(self, down: Downlink) -> None:
        """Every message gets exactly one reply, whatever its bytes: a result or an error with a code."""
        name = down.topic.rsplit("/", 1)[-1][:MAX_NAME]
        reply_to, corr_id = down.response_topic, None
        try:
            try:
                body = safe_json.loads(down.payload, max_bytes=MAX_COMMAND_BYTES) if down.payload else {}
            except safe_json.JsonRejected as err:
                raise CommandError("bad_request", f"payload is not JSON: {err.reason}") from None
            req: SignedCommand | CommandRequest
            if isinstance(body, dict) and "sig" in body:
                req = self._verify_signed(name, body)
                try:  # durable: on disk before the command runs
                    await asyncio.to_thread(self.replay.accept, req.id, req.issued_at,
                                            self.config.current.remote.command_max_age)
                except Replayed as err:
                    raise CommandError("unauthorized", str(err)) from None
                signed = True
            else:
                try:
                    req = CommandRequest.model_validate(body)
                except ValidationError as err:
                    raise CommandError("bad_request", "; ".join(describe_validation_error(err)[:10])) from None
                signed = False
            reply_to, corr_id = reply_to or req.reply_to, req.correlation_id
            cmd = self.table.get(name)
            if cmd is not None and cmd.changes_something and not signed:
                raise CommandError("unauthorized", f"{name} changes something: it must be signed")
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    result = await self.execute(name, req.args)
            except TimeoutError:
                raise CommandError("failed", f"{name} did not finish within {COMMAND_TIMEOUT:g} s") from None
            response = CommandResponse(ok=True, command=name, result=result, correlation_id=corr_id,
                                       ts=iso_ts(time.time()))
            self._count(name, "ok")
        except CommandError as err:
            self.rejections["command", err.code] += 1
            log.warning("command %s refused: %s", loggable_id(name), err.code)
            response = CommandResponse(ok=False, command=name, error=err.message, code=err.code,  # type: ignore[arg-type]
                                       correlation_id=corr_id, ts=iso_ts(time.time()))
            self._count(name, err.code)
        except Exception as err:  # a failing command must answer, never take the gateway down
            log.error("command %s failed: %s", loggable_id(name), exception_summary(err))
            response = CommandResponse(ok=False, command=name, error=f"{type(err).__name__}", code="failed",
                                       correlation_id=corr_id, ts=iso_ts(time.time()))
            self._count(name, "failed")
        self._reply(name, reply_to, response, down.correlation_data)

    def _reply(self, name: str, reply_to: str | None, response: CommandResponse, correlation: bytes | None) -> None:
        topics = self.topics
        # A reply topic named by the message must be one the gateway may publish to: an invalid one (a wildcard,
        # U+0000) would make the broker drop the connection, and the command would come back after the reconnect.
        # Nor may it be one of this store's own uplink topics (an unsigned request could otherwise make the store
        # publish a fake event or status to head office): only cmd-reply/ is a reply topic in the store's tree.
        own = isinstance(reply_to, str) and reply_to.startswith(topics.base + "/") \
            and not reply_to.startswith(topics.base + "/cmd-reply/")
        topic = topics.command_reply(name)
        if is_publish_topic(reply_to) and not own:
            topic = reply_to
        elif not is_publish_topic(topic):
            topic = topics.command_reply("invalid")
        try:
            body = response.model_dump_json(exclude_none=True).encode()
        except ValueError as err:  # a result that is not JSON-safe: still an answer
            log.error("command %s: reply not serialisable: %s", loggable_id(name), exception_summary(err))
            body = CommandResponse(ok=False, command=name, error="the result could not be encoded", code="failed",
                                   ts=iso_ts(time.time())).model_dump_json(exclude_none=True).encode()
        try:
            self.uplink.publish_direct(topic, body, correlation_data=correlation)
        except ValueError as err:
            log.error("command %s: reply not sent: %s", loggable_id(name), exception_summary(err))

    def _verify_signed(self, name: str, body: dict[str, Any]) -> SignedCommand:
        config = self.config.current
        try:
            payload = verify(body, config.trust.public_keys)
        except SignatureError as err:
            raise CommandError("unauthorized", f"signature: {err.reason}") from None
        try:
            cmd = SignedCommand.model_validate(payload)
        except ValidationError as err:
            raise CommandError("bad_request", "; ".join(describe_validation_error(err)[:10])) from None
        if cmd.store_id != config.store_id:
            raise CommandError("unauthorized", f"signed for store {safe_json.echo(cmd.store_id)}, not this one")
        if cmd.command != name:
            raise CommandError("unauthorized", f"signed for command {safe_json.echo(cmd.command)}, sent as "
                               f"{safe_json.echo(name)}")
        return cmd

    # -- the commands ------------------------------------------------------------------------------------------
    async def _ping(self, _args: NoArgs) -> dict[str, Any]:
        return {"pong": True, "version": __version__, "config_version": self.config.current.config_version}

    async def _status(self, _args: NoArgs) -> dict[str, Any]:
        return self.gateway_status()

    async def _restart(self, args: RestartArgs) -> dict[str, Any]:
        try:
            self.devices.restart(args.device)
        except KeyError:
            known = ", ".join(self.devices.devices) or "none"
            raise CommandError("bad_args", f"no device {args.device!r} (devices: {known})") from None
        return {"restarting": args.device}

    def _prices(self) -> PricesPart:
        if self.prices is None or not self.prices.ready.is_set():
            raise CommandError("unavailable", "this gateway runs no price book (the prices part is not running)")
        return self.prices

    async def _reprint(self, args: ReprintArgs) -> dict[str, Any]:
        """Queue the labels in force again on every label device, as reprint jobs of their own (the drivers
        print/push them at-least-once, also where the same label was printed before). Under the price
        coordinator's lock, so a reprint never interleaves with a change being prepared; the book is read in a
        worker thread."""
        part = self._prices()
        book = part.book
        if book.active_version <= 0:
            raise CommandError("unavailable", "no active price list yet: nothing to print")
        labels = [t for t in part.targets.all() if t.role == "label"]
        if not labels:
            raise CommandError("unavailable", "no label printers or shelf-label systems are configured")
        wanted = None if args.all else set(args.skus or [])
        async with part.coordinator.lock:
            items = await asyncio.to_thread(lambda: [it for it in book.iter_items()
                                                     if wanted is None or it.sku in wanted])
            missing = sorted(wanted - {it.sku for it in items}) if wanted is not None else []
            if missing:
                raise CommandError("bad_args", f"not in the active price list: {', '.join(missing[:20])}")
            request = f"reprint-{uuid.uuid4().hex[:12]}"
            change = _ReprintChange(book.active_version, request, book.currency or "", items, {})
            results: dict[str, str] = {}
            for target in labels:
                drv = part.targets.instance(target.device)  # queued durably even while the device is away
                if drv is None:
                    results[target.device] = "not running"
                    continue
                try:
                    n = await drv.price_reprint(request, change)
                    results[target.device] = f"queued {n}"
                except Exception as err:
                    results[target.device] = f"failed: {err}"
        if not any(r.startswith("queued") for r in results.values()):
            raise CommandError("failed", "no label device took the reprint: " +
                               "; ".join(f"{d}: {r}" for d, r in results.items()))
        return {"items": len(items), "version": change.version, "request": request, "devices": results}

    async def _resync(self, _args: NoArgs) -> dict[str, Any]:
        part = self._prices()
        drift = await part.auditor.audit()
        await part.intake.check_behind()  # asks head office for a resend when the desired version is newer
        part.coordinator.wake.set()  # and lets a batch that was waiting on a device try again
        desired = part.intake.desired
        return {"active_version": part.book.active_version,
                "desired_version": desired.version if desired is not None else None, "drift": drift}

