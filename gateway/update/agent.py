"""The store's side of fleet updates inside the gateway: take the signed ``update`` command, fetch and verify
the bundle, wait for the maintenance window, hand it to the root-side updater, and report every step.

Head office sends ``cmd/update`` as a signed command (storelink.remote.commands checks signature, store id, age
and replay). The agent answers at once (accepted, or why not) and works in the background:

    downloading -> downloaded (signature and every hash checked) -> waiting_window -> installing (pending.json)
    -> trial (the updater switched and restarted us) -> healthy | rolled_back | failed (from result.json)

Each step is retained on ``{base}/update/state`` (UpdateState) and the outcomes are events (``update.*``) in the
outbox, so head office hears about a rollback even when it happened while the store was offline. The agent's
own state survives restarts in ``<state dir>/update/agent.json``; the updater's verdict in ``result.json`` is
reported by whichever release runs after it. A part (storelink.parts): storelink.app.standard_parts builds it and
gives its ``command()`` to the commands part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storelink import __version__
from storelink.config import RunningConfig
from storelink.drivers.base import EventRef
from storelink.outbox import iso_ts
from storelink.parts import BasePart
from storelink.remote.commands import Command, CommandError
from storelink.system.files import write_atomically
from storelink.update.download import DownloadError, download
from storelink.update.manifest import BundleError, check_platform, verify_bundle
from storelink.update.models import PendingUpdate, UpdateArgs, UpdatePhase, UpdateResult, UpdateState
from storelink.update.updater import read_model, update_dir, write_model
from storelink.uplink import Uplink

log = logging.getLogger(__name__)
BUSY: set[str] = {"downloading", "downloaded", "waiting_window", "installing", "trial"}
EmitFn = Callable[[str, str, dict[str, Any]], Awaitable[EventRef]]


class UpdateRefused(Exception):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class UpdateAgent(BasePart):
    name = "update"

    def __init__(self, config: RunningConfig, uplink: Uplink, emit: EmitFn, *, window_poll: float = 30.0,
                 result_poll: float = 1.0):
        self.config = config
        self.uplink = uplink
        self.emit = emit
        self.dir = update_dir(config.current)
        self.window_poll = window_poll
        self.result_poll = result_poll
        self.state: dict[str, Any] = {"state": "idle", "target": None, "rollout": None, "reason": None,
                                      "progress": None, "reported_result": None, "rolled_back": [],
                                      "job": None}
        self._job: asyncio.Task[None] | None = None

    def command(self) -> Command:
        """The signed ``update`` command, for the commands part's table."""

        async def run_command(args: UpdateArgs) -> dict[str, Any]:
            try:
                return await self.on_command(args)
            except UpdateRefused as err:
                raise CommandError(err.code, str(err)) from None

        return Command(UpdateArgs, True, run_command, "install a signed release or roll back to one")

    # -- life cycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Reports the updater's verdict, and finishes a job a restart interrupted."""
        await asyncio.to_thread(self._load)
        await self._report_result()
        self._publish()
        if self.state["state"] in ("downloading", "downloaded", "waiting_window") and self.state.get("job"):
            self._job = asyncio.create_task(self._work(UpdateArgs.model_validate(self.state["job"])))

    async def run(self) -> None:
        """Reports the updater's verdict when it comes."""
        while True:
            await asyncio.sleep(self.result_poll)
            if self.state["state"] in ("installing", "trial"):
                await self._report_result()

    async def stop(self) -> None:
        if self._job is not None and not self._job.done():
            self._job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._job

    def status(self) -> dict[str, Any]:
        return {"version": __version__, **{k: self.state[k] for k in ("state", "target", "rollout", "reason",
                                                                       "progress")}}

    # -- state --------------------------------------------------------------------------------------------
    def _load(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads((self.dir / "agent.json").read_text())
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict):
            self.state.update({k: v for k, v in saved.items() if k in self.state})
        if (self.dir / "trial.json").exists():
            self.state["state"] = "trial"
        elif (self.dir / "pending.json").exists():
            self.state["state"] = "installing"

    def _save(self) -> None:
        write_atomically(self.dir / "agent.json", json.dumps(self.state, indent=1).encode(), 0o640)

    def _publish(self) -> None:
        payload = UpdateState(version=__version__, state=self.state["state"], target=self.state["target"],
                              rollout=self.state["rollout"], reason=self.state["reason"],
                              progress=self.state["progress"], groups=list(self.config.current.groups),
                              ts=iso_ts(time.time()))
        self.uplink.publish_state(self.uplink.topics.update_state, payload)

    async def _set(self, phase: UpdatePhase, *, reason: str | None = None, event: bool = False, **extra: Any) -> None:
        self.state.update(state=phase, reason=reason, progress=None, **extra)
        await asyncio.to_thread(self._save)
        self._publish()
        if event:
            try:
                await self.emit(f"update.{phase}", "gateway", {
                    "version": __version__, "target": self.state["target"], "rollout": self.state["rollout"],
                    "reason": reason})
            except Exception as err:  # the retained state is the record; the event is the audit copy
                log.error("cannot record update.%s event: %s", phase, err)

    async def _report_result(self) -> None:
        result = await asyncio.to_thread(read_model, self.dir / "result.json", UpdateResult)
        if result is None or result.ts == self.state.get("reported_result"):
            return
        self.state["reported_result"] = result.ts
        if result.outcome == "rolled_back":
            self.state["rolled_back"] = sorted({*self.state["rolled_back"], result.version})[-20:]
        log.log(logging.INFO if result.outcome == "healthy" else logging.ERROR, "update to %s: %s%s",
                result.version, result.outcome, f" ({result.reason})" if result.reason else "")
        await self._set(result.outcome, reason=result.reason, event=True, target=result.version,
                        rollout=result.rollout, job=None)
        for old in (self.dir / "bundles").glob("*.bundle"):  # installed or refused: the download is done with
            old.unlink(missing_ok=True)

    # -- the command --------------------------------------------------------------------------------------
    async def on_command(self, args: UpdateArgs) -> dict[str, Any]:
        cfg = self.config.current.update
        if not cfg.enabled:
            raise UpdateRefused("unavailable", "software updates are disabled on this store ([update] enabled)")
        version = args.release.version if args.action == "install" and args.release else args.version
        if version is None:
            raise UpdateRefused("bad_args", "install needs release {version, url, sha256, size}; rollback a version")
        if version == __version__:
            return {"state": "healthy", "version": version, "note": "already running"}
        busy = self.state["state"] in BUSY
        if busy and self.state["target"] == version:
            return {"state": self.state["state"], "version": version, "note": "already in progress"}
        if busy:
            raise UpdateRefused("unavailable", f"busy with release {self.state['target']} ({self.state['state']})")
        if args.action == "install" and version in self.state["rolled_back"]:
            raise UpdateRefused("failed", f"release {version} was rolled back on this store before; publish a "
                                          "newer one")
        await self._set("downloading" if args.action == "install" else "waiting_window", target=version,
                        rollout=args.rollout, job=args.model_dump(mode="json"))
        self._job = asyncio.create_task(self._work(args), name="update")
        return {"state": self.state["state"], "version": version}

    async def _work(self, args: UpdateArgs) -> None:
        version = args.release.version if args.release else args.version
        assert version is not None
        try:
            bundle = None
            if args.action == "install":
                assert args.release is not None
                bundle = await self._fetch(args)
            cfg = self.config.current.update
            if not args.ignore_window and not cfg.in_window(datetime.now(UTC)):
                await self._set("waiting_window", target=version)
                while not self.config.current.update.in_window(datetime.now(UTC)):
                    await asyncio.sleep(self.window_poll)
            pending = PendingUpdate(action=args.action, version=version, bundle=bundle,
                                    sha256=args.release.sha256 if args.release else None, rollout=args.rollout,
                                    allow_irreversible=args.allow_irreversible, requested_at=time.time())
            await asyncio.to_thread(write_model, self.dir / "pending.json", pending)  # storelink-update.path
            await self._set("installing", target=version)
        except (DownloadError, BundleError, OSError) as err:
            reason = getattr(err, "reason", None) or str(err)
            log.error("update to %s refused: %s", version, reason)
            for name in (f"storelink-{version}.bundle", f"storelink-{version}.bundle.part",
                         f"storelink-{version}.bundle.part.json"):
                (self.dir / "bundles" / name).unlink(missing_ok=True)  # a refused bundle is not kept
            await self._set("failed", reason=reason, event=True, job=None)

    async def _fetch(self, args: UpdateArgs) -> Path:
        release = args.release
        assert release is not None
        dest = self.dir / "bundles" / f"storelink-{release.version}.bundle"
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(have: int, size: int) -> None:  # from the download thread; publish at most every 2 s
            if time.monotonic() - last[0] >= 2:
                last[0] = time.monotonic()
                loop.call_soon_threadsafe(self._progress, have / size)

        path = await asyncio.to_thread(download, release.url, dest, sha256=release.sha256, size=release.size,
                                       ca=self.config.current.update.ca, progress=progress)
        verified = await asyncio.to_thread(verify_bundle, path, self.config.current.trust.public_keys,
                                           expected_version=release.version)
        check_platform(verified.manifest)
        await self._set("downloaded", target=release.version)
        return path

    def _progress(self, fraction: float) -> None:
        if self.state["state"] == "downloading":
            self.state["progress"] = round(fraction, 3)
            self._publish()

