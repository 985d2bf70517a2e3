"""Head office's side for the ingest tests: real `storelink hq ingest` / `hq serve` processes and database reads."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from storelink.hq.db import Database
from tests.helpers import STORELINK, ChildProcess, free_port, wait_for


class IngestProcess(ChildProcess):
    """A real `storelink hq ingest` worker (so tests can kill -9 it and start it again under the same id)."""

    def __init__(self, workdir: Path, database: str | None, broker_port: int | None, worker: str = "w1", *extra: str,
                 env: dict[str, str] | None = None):
        """`database`/`broker_port` None: hq.toml's (STORELINK_HQ_CONFIG in `env`)."""
        self.workdir, self.database, self.broker_port, self.worker = workdir, database, broker_port, worker
        self.extra, self.env = list(extra), env
        self.log = workdir / f"ingest-{worker}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, wait: bool = True) -> IngestProcess:
        self._offset = self.log.stat().st_size if self.log.exists() else 0  # wait for this start's own line
        cmd = [STORELINK, "hq", "ingest", "--worker-id", self.worker, "--tracker-every", "0.5", *self.extra]
        if self.database is not None:
            cmd += ["--database", self.database]
        if self.broker_port is not None:
            cmd += ["--broker", f"127.0.0.1:{self.broker_port}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.workdir,
                                         env={**os.environ, **self.env} if self.env else None)
        if wait:
            self.wait_subscribed()
        return self

    def wait_subscribed(self) -> None:
        wait_for(lambda: self._subscribed(), 30, what=f"ingest worker {self.worker} subscribed")

    def _subscribed(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ingest exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return b"subscribed on" in self.log.read_bytes()[self._offset:]



class ServeProcess(ChildProcess):
    """A real `storelink hq serve` (`database` None: hq.toml's, STORELINK_HQ_CONFIG in `env`)."""

    def __init__(self, workdir: Path, database: str | None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = workdir / "serve.log"
        cmd = [STORELINK, "hq", "serve", "--listen", f"127.0.0.1:{self.port}"]
        cmd += ["--database", database] if database is not None else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=workdir,
                                         env={**os.environ, **env} if env else None)
        wait_for(self._up, 20, what="hq serve to answer")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"hq serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as resp:
                body = resp.read()
                ctype = resp.headers.get("Content-Type", "")
                return resp.status, json.loads(body) if "json" in ctype else body.decode()
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def stop(self) -> None:
        """A clean stop (SIGTERM), else a kill."""
        try:
            if self.proc.poll() is None:
                self.terminate(10)
        except subprocess.TimeoutExpired:
            super().stop()


def one(db: Database, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return db.query(sql, params)[0][0]

