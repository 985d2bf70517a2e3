"""The root-side updater: install a verified release, switch, restart, judge it, roll back by itself.

Runs as its own process (``storelink update apply``, started by ``storelink-update.path`` whenever the gateway
leaves a ``pending.json`` and whenever a ``trial.json`` is left over), never inside the gateway: the gateway user
cannot write the releases, and a new release that crashes cannot judge itself. The updater runs from the
release that was current when it started (its ``#!`` line names that release's own venv), so the judge is the
known-good code, not the release on trial.

    pending.json (from the agent) -> verify bundle -> install venv -> trial.json -> switch -> restart -> judge
        healthy      -> result.json "healthy"; older releases beyond [update] keep_releases are removed
        not healthy  -> switch back -> restart -> result.json "rolled_back" with the reason
A ``trial.json`` found at start (the updater or the box died mid-trial) is judged again with a fresh deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from storelink.config import GatewayConfig
from storelink.system.files import write_atomically
from storelink.system.schema import rollback_problems, schemas_as_dict
from storelink.update.health import Gate, baseline_of, fetch_status
from storelink.update.manifest import BundleError, check_platform, verify_bundle
from storelink.update.models import PendingUpdate, Trial, UpdateResult
from storelink.update.releases import InstallError, Releases
from storelink.update.service import ServiceError, ServiceManager

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def update_dir(config: GatewayConfig) -> Path:
    """Where the agent and the updater leave files for each other (group storelink, mode 0770)."""
    return config.storage.path.parent / "update"


def status_url(config: GatewayConfig) -> str:
    host, port = config.http.host_port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def read_model(path: Path, model: type[M]) -> M | None:
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as err:
        log.error("%s is unreadable (%s); moving it aside", path, str(err).splitlines()[0])
        with contextlib.suppress(OSError):
            path.replace(path.with_name(path.name + ".bad"))
        return None


def write_model(path: Path, value: BaseModel) -> None:
    write_atomically(path, value.model_dump_json(indent=1).encode(), 0o640)


class Updater:
    def __init__(self, config: GatewayConfig, releases: Releases, service: ServiceManager, *,
                 python: str = "/usr/bin/python3", poll: float = 0.5):
        self.config = config
        self.settings = config.update
        self.releases = releases
        self.service = service
        self.python = python
        self.poll = poll
        self.dir = update_dir(config)
        self.url = status_url(config)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "updater.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def run_once(self) -> UpdateResult | None:
        """Finish a trial left over, else act on pending.json; None when there is nothing to do."""
        with self._locked():
            trial = read_model(self.dir / "trial.json", Trial)
            if trial is not None:
                log.warning("resuming the trial of release %s", trial.version)
                trial.deadline = max(trial.deadline, time.time() + self.settings.health_deadline)
                return self._judge(trial)
            pending = read_model(self.dir / "pending.json", PendingUpdate)
            if pending is None:
                return None
            try:
                trial = self._prepare(pending)
            except Exception as err:  # anything at all: pending.json must go, or the path unit loops on it
                reason = getattr(err, "reason", None) or str(err)
                if not isinstance(err, BundleError | InstallError | ServiceError):
                    log.exception("release %s: the updater failed", pending.version)
                    reason = f"updater error: {type(err).__name__}: {err}"
                log.error("release %s refused: %s", pending.version, reason)
                (self.dir / "pending.json").unlink(missing_ok=True)
                return self._finish(UpdateResult(version=pending.version, previous=self.releases.current(),
                                                 running=self.releases.current() or "?", outcome="failed",
                                                 reason=reason, rollout=pending.rollout, ts=time.time()))
            return self._judge(trial)

    # -- before the switch --------------------------------------------------------------------------------
    def _prepare(self, pending: PendingUpdate) -> Trial:
        current = self.releases.current()
        if current is None:
            raise InstallError(f"no current release under {self.releases.dir}")
        if pending.version == current:
            raise InstallError(f"release {current} is already running")
        reversible = True
        if pending.action == "install":
            bundle = (pending.bundle or Path()).resolve()
            if bundle.parent != (self.dir / "bundles").resolve():
                raise BundleError(f"bundles are only taken from {self.dir / 'bundles'}")
            staging = self.releases.dir / f".staging-{pending.version}"
            verified = verify_bundle(bundle, self.config.trust.public_keys, expected_version=pending.version,
                                     extract_to=staging)
            try:
                check_platform(verified.manifest)
                running = self.releases.info(current).get("schemas") or schemas_as_dict()
                new = {k: v.model_dump() for k, v in verified.manifest.schemas.items()}
                blocked = rollback_problems(running, new)  # type: ignore[arg-type]
                if blocked and not pending.allow_irreversible:
                    raise BundleError("a rollback past this release would be impossible (" + "; ".join(blocked)
                                      + "); head office must allow it explicitly (--allow-irreversible)")
                reversible = not blocked
                assert verified.wheels_dir is not None
                self.releases.install(verified.manifest, verified.manifest_sha256, verified.wheels_dir,
                                      python=self.python)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        elif not self.releases.is_installed(pending.version):
            raise InstallError(f"cannot roll back to {pending.version}: it is not installed (installed: "
                               f"{', '.join(self.releases.installed())})")
        baseline = baseline_of(fetch_status(self.url))
        trial = Trial(version=pending.version, previous=current, rollout=pending.rollout, action=pending.action,
                      reversible=reversible, started_at=time.time(),
                      deadline=time.time() + self.settings.health_deadline,
                      restarts_at_switch=self.service.restarts(), baseline=baseline)
        write_model(self.dir / "trial.json", trial)  # from here on a crash resumes the judging
        self.releases.switch_to(pending.version)
        (self.dir / "pending.json").unlink(missing_ok=True)
        log.info("switched to %s; restarting the gateway (baseline: %s)", pending.version, json.dumps(baseline))
        try:
            self.service.restart()
        except ServiceError:
            self.releases.switch_to(current)  # never leave a release switched in that nobody judges
            raise
        trial.restarts_at_switch = self.service.restarts()
        trial.deadline = time.time() + self.settings.health_deadline
        write_model(self.dir / "trial.json", trial)
        return trial

    # -- after the switch ---------------------------------------------------------------------------------
    def _judge(self, trial: Trial) -> UpdateResult:
        gate = Gate(trial.version, trial.baseline, trial.deadline, self.settings.healthy_for,
                    self.settings.crash_loop_restarts, trial.restarts_at_switch)
        while True:
            try:
                restarts = self.service.restarts()
            except ServiceError as err:
                log.warning("%s", err)
                restarts = trial.restarts_at_switch
            verdict = gate.observe(fetch_status(self.url), restarts)
            if verdict is not None:
                break
            time.sleep(self.poll)
        result = UpdateResult(version=trial.version, previous=trial.previous, running=trial.version,
                              outcome="healthy", rollout=trial.rollout, ts=time.time())
        if verdict == "healthy":
            log.info("release %s is healthy", trial.version)
            gone = self.releases.remove_old(self.settings.keep_releases, {trial.previous})
            if gone:
                log.info("removed old releases %s", ", ".join(gone))
        elif not trial.reversible:
            log.error("release %s failed its health gate (%s) but cannot be rolled back", trial.version, verdict)
            result.outcome, result.reason = "failed", f"{verdict}; not rolled back: its data cannot be read by " \
                                                      f"{trial.previous}"
        else:
            log.error("release %s failed its health gate: %s; rolling back to %s", trial.version, verdict,
                      trial.previous)
            self.releases.switch_to(trial.previous)
            result.outcome, result.reason, result.running = "rolled_back", verdict, trial.previous
            try:
                self.service.restart()
            except ServiceError as err:
                result.reason += f"; restart after the rollback: {err}"
            self._wait_running(trial.previous)
        return self._finish(result)

    def _wait_running(self, version: str) -> None:
        deadline = time.monotonic() + self.settings.health_deadline
        while time.monotonic() < deadline:
            status = fetch_status(self.url)
            if status is not None and status.get("version") == version:
                return
            time.sleep(self.poll)
        log.error("release %s did not answer within %g s after the rollback", version, self.settings.health_deadline)

    def _finish(self, result: UpdateResult) -> UpdateResult:
        write_model(self.dir / "result.json", result)
        (self.dir / "trial.json").unlink(missing_ok=True)
        return result
